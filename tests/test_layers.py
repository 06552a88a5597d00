"""Layer plugins: the contract for every built-in, Gram paths, lookup, KFAC factors, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.capture import Call, Capture
from curvlib.layers import (
    Conv1dPlugin,
    Conv2dPlugin,
    Conv3dPlugin,
    GenericPlugin,
    KFACFactors,
    LayerPlugin,
    LayerPluginError,
    LinearPlugin,
    SampleInteractionError,
    plugin_for,
)
from curvlib.layers._patch import MAX_INTERMEDIATE, choose_gram_method, gram_costs
from curvlib.testing.assertions import assert_close
from curvlib.testing.contract import check_layer_plugin
from curvlib.testing.strategies import conv_cases, examples, generic_cases, linear_cases, seeds

# -- the contract: every built-in plugin equals the autograd reference ---------------------


def test_linear_plugin_contract():
    check_layer_plugin(LinearPlugin(), linear_cases(max_calls=3))


@pytest.mark.parametrize(
    ("plugin", "dim"),
    [(Conv1dPlugin, 1), (Conv2dPlugin, 2), (Conv3dPlugin, 3)],
)
def test_conv_plugin_contract(plugin, dim):
    check_layer_plugin(plugin(), conv_cases(dims=(dim,)))


# "auto" above picks either path depending on the drawn shapes; these force each path on
# every shape. Fewer examples: the shapes are the same as above and each case is slow-ish.
@pytest.mark.parametrize("method", ["contract", "materialise"])
def test_forced_gram_paths_satisfy_the_contract(method):
    check_layer_plugin(LinearPlugin(method), linear_cases(max_calls=3), max_examples=examples(0.25))
    for plugin, dim in ((Conv1dPlugin, 1), (Conv2dPlugin, 2), (Conv3dPlugin, 3)):
        check_layer_plugin(plugin(method), conv_cases(dims=(dim,)), max_examples=examples(0.15))


def test_generic_plugin_contract_on_unregistered_modules():
    check_layer_plugin(GenericPlugin(), generic_cases())


def test_generic_plugin_contract_on_registered_layers():
    """The generic path agrees on the layers that have a fast plugin, too."""
    check_layer_plugin(GenericPlugin(), st.one_of(linear_cases(), conv_cases()))


@given(case=st.one_of(linear_cases(), conv_cases()), seed=seeds())
def test_fast_plugins_equal_generic_path(case, seed):
    """Per-sample gradients, Gram and weighted gradients of the fast path equal the generic one."""
    module = case.module
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for args, kwargs in case.calls:
        with torch.no_grad():
            out = module(*args, **kwargs)
        calls.append(Call(args, kwargs, out, torch.randn(out.shape, generator=gen,
                                                         dtype=out.dtype), out._version))
    fast, generic = plugin_for(module), GenericPlugin()
    assert not isinstance(fast, GenericPlugin)
    for what in ("per_sample_grads", "gram"):
        a, b = getattr(fast, what)(module, calls), getattr(generic, what)(module, calls)
        assert a.keys() == b.keys()
        for name in a:
            assert_close(a[name], b[name], what=f"{what} {name}")
    c = torch.randn(case.batch_size, generator=gen, dtype=torch.float64)
    a, b = fast.weighted_grads(module, calls, c), generic.weighted_grads(module, calls, c)
    for name in a:
        assert_close(a[name], b[name], what=f"weighted {name}")


# -- row_dots and weighted_grads(params=...) ---------------------------------------------------


def _random_calls(case, gen):
    calls = []
    for args, kwargs in case.calls:
        with torch.no_grad():
            out = case.module(*args, **kwargs)
        calls.append(Call(args, kwargs, out, torch.randn(out.shape, generator=gen,
                                                         dtype=out.dtype), out._version))
    return calls


def _no_materialising(plugin):
    """``plugin`` with ``per_sample_grads`` replaced by a failure (on this instance only)."""

    def fail(*args, **kwargs):
        raise AssertionError("per-sample gradients were materialised")

    plugin.per_sample_grads = fail
    return plugin


@given(case=st.one_of(linear_cases(), conv_cases(), generic_cases()), seed=seeds())
def test_row_dots_fast_paths_equal_the_materialising_default(case, seed):
    """Linear, convolutions and the generic plugin never form ``g_n`` for ``⟨g_n, v⟩`` and
    agree with the base class's default, which does."""
    module = case.module
    gen = torch.Generator().manual_seed(seed)
    calls = _random_calls(case, gen)
    vectors = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64)
               for k, p in module.named_parameters(recurse=False)}
    plugin = plugin_for(module)
    expected = LayerPlugin.row_dots(plugin, module, calls, vectors)
    for fast in (_no_materialising(type(plugin)()), _no_materialising(GenericPlugin())):
        got = fast.row_dots(module, calls, vectors)
        assert got.keys() == expected.keys() == vectors.keys()
        for name in got:
            assert_close(got[name], expected[name], what=f"row_dots {name}")
    # a subset: exactly the names asked for
    name = next(iter(vectors))
    assert set(plugin.row_dots(module, calls, {name: vectors[name]})) == {name}
    assert plugin.row_dots(module, calls, {}) == {}


def test_weighted_grads_of_one_parameter_skips_the_other():
    lin = nn.Linear(3, 2).double()
    calls = _calls(lin, torch.randn(4, 5, 3, dtype=torch.float64))
    conv = nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect", groups=2).double()
    conv_calls = _calls(conv, torch.randn(4, 2, 5, 6, dtype=torch.float64))
    c = torch.randn(4, dtype=torch.float64)
    for module, calls_, cls in ((lin, calls, LinearPlugin), (conv, conv_calls, Conv2dPlugin)):
        full = cls().weighted_grads(module, calls_, c)
        plugin = cls()

        def fail(*args, **kwargs):
            raise AssertionError("the weight gradient was computed")

        plugin.weight_gradient = fail
        bias_only = plugin.weighted_grads(module, calls_, c, params=["bias"])
        assert set(bias_only) == {"bias"}
        assert_close(bias_only["bias"], full["bias"])
        weight_only = cls().weighted_grads(module, calls_, c, params={"weight"})
        assert set(weight_only) == {"weight"}
        assert_close(weight_only["weight"], full["weight"])
        generic = GenericPlugin().weighted_grads(module, calls_, c, params=("bias",))
        assert set(generic) == {"bias"}
        assert_close(generic["bias"], full["bias"])
        assert cls().weighted_grads(module, calls_, c, params=[]) == {}


def test_unknown_or_frozen_names_are_errors():
    lin = nn.Linear(3, 2).double()
    lin.bias.requires_grad_(False)
    calls = _calls(lin, torch.randn(4, 3, dtype=torch.float64))
    c = torch.ones(4, dtype=torch.float64)
    v = torch.zeros(2, 3, dtype=torch.float64)
    for plugin in (LinearPlugin(), GenericPlugin()):
        for bad in ("bias", "nope"):
            with pytest.raises(ValueError, match=rf"no trainable parameter\(s\) \['{bad}'\].*"
                                                 rf"\['weight'\]"):
                plugin.weighted_grads(lin, calls, c, params=[bad])
            with pytest.raises(ValueError, match=rf"\['{bad}'\]"):
                plugin.row_dots(lin, calls, {"weight": v, bad: torch.zeros(2)})
            with pytest.raises(ValueError, match=rf"\['{bad}'\]"):
                LayerPlugin.row_dots(plugin, lin, calls, {bad: torch.zeros(2)})
        with pytest.raises(ValueError, match=r"vector for Linear.weight has shape \(3, 2\)"):
            plugin.row_dots(lin, calls, {"weight": v.T})
        with pytest.raises(LayerPluginError, match="not called"):
            plugin.row_dots(lin, [], {"weight": v})


def test_row_dots_in_the_working_dtype():
    """bf16 layers work in float32; float64 vectors and coefficients do not promote that."""
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    conv = nn.Conv1d(2, 3, 2, padding=1, padding_mode="circular").to(torch.bfloat16)
    cases = [(lin, _calls(lin, torch.randn(5, 2, 4, dtype=torch.bfloat16))),
             (conv, _calls(conv, torch.randn(5, 2, 6, dtype=torch.bfloat16)))]
    for module, calls in cases:
        vectors = {k: torch.randn(p.shape, dtype=torch.float64)
                   for k, p in module.named_parameters()}
        c = torch.randn(5, dtype=torch.float64)
        for plugin in (plugin_for(module), GenericPlugin()):
            dots = plugin.row_dots(module, calls, vectors)
            assert {d.dtype for d in dots.values()} == {torch.float32}
            default = LayerPlugin.row_dots(plugin, module, calls, vectors)
            for name in dots:
                assert dots[name].shape == (5,)
                assert_close(dots[name], default[name], rtol=1e-5, what="float32 round-off")
            one = plugin.weighted_grads(module, calls, c, params=["weight"])
            assert one["weight"].dtype == torch.float32


# -- the Gram paths ----------------------------------------------------------------------------


def test_gram_costs_prefer_identity_for_wide_linear_layers():
    # a wide Linear layer without positions: the identity is far cheaper
    costs = gram_costs(n=128, t=1, g=1, d=1000, o=500)
    assert costs["materialise"] > 50 * costs["contract"]
    assert choose_gram_method("auto", 128, 1, 1, 1000, 500) == "contract"
    # many positions and narrow channels (a convolution): materialising is cheaper
    assert choose_gram_method("auto", 32, 256, 1, 27, 16) == "materialise"
    # forced choices are kept
    assert choose_gram_method("materialise", 128, 1, 1, 1000, 500) == "materialise"
    with pytest.raises(ValueError, match="gram_method"):
        choose_gram_method("fast", 1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="gram_method"):
        LinearPlugin("fast")


def test_gram_method_respects_memory_cap():
    # the contraction's (NT)^2 intermediate would be huge; materialisation fits
    n, t = 64, 2048
    assert (n * t) ** 2 > MAX_INTERMEDIATE
    assert choose_gram_method("auto", n, t, 1, 2, 2) == "materialise"


# -- lookup ------------------------------------------------------------------------------------


def test_lookup_by_mro_and_generic_fallback():
    class MyLinear(nn.Linear):
        pass

    assert isinstance(plugin_for(nn.Linear(2, 3)), LinearPlugin)
    assert isinstance(plugin_for(MyLinear(2, 3)), LinearPlugin)
    assert isinstance(plugin_for(nn.Conv2d(1, 1, 1)), Conv2dPlugin)
    assert isinstance(plugin_for(nn.Conv1d(1, 1, 1)), Conv1dPlugin)
    assert isinstance(plugin_for(nn.Conv3d(1, 1, 1)), Conv3dPlugin)
    assert isinstance(plugin_for(nn.LayerNorm(3)), GenericPlugin)
    layers = curvlib.available("layer")["layer"]
    for name in ("linear", "conv1d", "conv2d", "conv3d", "generic"):
        assert layers[name] == "curvlib"


def test_user_plugin_for_a_subclass_wins_over_the_base_class(clean_registry):
    class MyLinear(nn.Linear):
        pass

    @curvlib.register("layer", "my_linear")
    class MyPlugin(LinearPlugin):
        module_types = (MyLinear,)

    assert isinstance(plugin_for(MyLinear(2, 2)), MyPlugin)
    assert type(plugin_for(nn.Linear(2, 2))) is LinearPlugin


def test_two_plugins_claiming_one_class_is_an_error(clean_registry):
    @curvlib.register("layer", "other_linear")
    class Other(LinearPlugin):
        module_types = (nn.Linear,)

    with pytest.raises(LayerPluginError, match=r"'linear', 'other_linear'.*overwrite=True"):
        plugin_for(nn.Linear(2, 2))


def test_replacing_a_builtin_with_overwrite(clean_registry):
    @curvlib.register("layer", "linear", overwrite=True)
    class Replacement(LinearPlugin):
        pass

    assert isinstance(plugin_for(nn.Linear(2, 2)), Replacement)


# -- rejections and errors ---------------------------------------------------------------------


def _calls(module, *args):
    with Capture([module]) as cap:
        out = module(*args)
        cap.backward_to_outputs(out.square().sum())
    return cap.calls[module]


def test_batchnorm_in_training_mode_is_rejected():
    bn = nn.BatchNorm1d(3).double()
    calls = _calls(bn, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(SampleInteractionError, match=r"BatchNorm1d.*training mode.*eval\(\)"):
        GenericPlugin().per_sample_grads(bn, calls)
    with pytest.raises(SampleInteractionError, match=r"registered layer plugins: .*linear"):
        GenericPlugin().weighted_grads(bn, calls, torch.ones(4, dtype=torch.float64))
    bn.eval()
    calls = _calls(bn, torch.randn(4, 3, dtype=torch.float64))
    assert GenericPlugin().per_sample_grads(bn, calls)["weight"].shape == (4, 3)


def test_a_container_with_batchnorm_in_training_is_rejected():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x) * self.scale

    block = Block().double()
    calls = _calls(block, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(SampleInteractionError, match="submodule 'bn'"):
        GenericPlugin().gram(block, calls)


def test_hidden_sample_coupling_and_dropout_are_detected():
    class CenterBatch(nn.Module):  # subtracts the batch mean: the samples interact
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x):
            return (x - x.mean(0, keepdim=True)) * self.weight

    module = CenterBatch()
    calls = _calls(module, torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(SampleInteractionError, match="mixes the samples"):
        GenericPlugin().per_sample_grads(module, calls)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(5, dtype=torch.float64))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(x * self.weight)

    noisy = Noisy()
    calls = _calls(noisy, torch.randn(6, 5, dtype=torch.float64))
    with pytest.raises(SampleInteractionError, match="dropout"):
        GenericPlugin().per_sample_grads(noisy, calls)
    with pytest.raises(SampleInteractionError, match="dropout"):
        GenericPlugin().weighted_grads(noisy, calls, torch.ones(6, dtype=torch.float64))


def test_plugin_errors_are_clear():
    lin = nn.Linear(3, 2).double()
    with pytest.raises(LayerPluginError, match="not called"):
        LinearPlugin().per_sample_grads(lin, [])
    x = torch.randn(4, 3, dtype=torch.float64)
    with Capture([lin]) as cap:
        lin(x)
    with pytest.raises(LayerPluginError, match=r"no output gradient.*backward_to_outputs"):
        LinearPlugin().gram(lin, cap.calls[lin])
    calls = _calls(lin, x)
    with pytest.raises(ValueError, match=r"coefficients must have shape \(4,\)"):
        LinearPlugin().weighted_grads(lin, calls, torch.ones(3, dtype=torch.float64))
    with Capture([lin]) as cap:
        a, b = lin(x), lin(x[:2])
        cap.backward_to_outputs(a.sum() + b.sum())
    with pytest.raises(LayerPluginError, match="different batch sizes"):
        LinearPlugin().per_sample_grads(lin, cap.calls[lin])
    generic_only = GenericPlugin()
    with pytest.raises(LayerPluginError, match="no Kronecker factors"):
        generic_only.kfac_factors(lin, calls)


def test_frozen_parameters_are_left_out():
    lin = nn.Linear(3, 2).double()
    lin.bias.requires_grad_(False)
    calls = _calls(lin, torch.randn(4, 3, dtype=torch.float64))
    for plugin in (LinearPlugin(), GenericPlugin()):
        assert set(plugin.per_sample_grads(lin, calls)) == {"weight"}
        assert set(plugin.gram(lin, calls)) == {"weight"}


def test_half_precision_inputs_give_float32_curvature():
    lin = nn.Linear(4, 3).to(torch.bfloat16)
    calls = _calls(lin, torch.randn(5, 4, dtype=torch.bfloat16))
    plugin = LinearPlugin()
    assert plugin.gram(lin, calls)["weight"].dtype == torch.float32
    assert plugin.per_sample_grads(lin, calls)["weight"].dtype == torch.float32
    assert plugin.kfac_factors(lin, calls).input_cov.dtype == torch.float32
    # float64 coefficients do not promote float32 work to float64
    c = torch.ones(5, dtype=torch.float64)
    for p in (plugin, GenericPlugin()):
        assert p.weighted_grads(lin, calls, c)["weight"].dtype == torch.float32


# -- KFAC factors --------------------------------------------------------------------------------


@given(case=st.one_of(linear_cases(max_calls=1), conv_cases(max_calls=1)), seed=seeds(),
       mode=st.sampled_from(["expand", "reduce"]))
def test_kfac_factors_from_their_definitions(case, seed, mode):
    """A and B from X and Z written out position by position, with the bias folded in."""
    module = case.module
    (args, _), = case.calls
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = module(*args)
    z = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    call = Call(args, {}, out, z, out._version)
    plugin = plugin_for(module)
    factors = plugin.kfac_factors(module, [call], mode=mode)
    assert isinstance(factors, KFACFactors)
    has_bias = module.bias is not None
    # positions t, groups g: input vectors x[n,t,g] (patches for a convolution), z[n,t,g]
    x_nt, z_nt = plugin.patches(module, call)  # (N, T, G, D), (N, T, G, O)
    n, t = x_nt.shape[:2]
    for g in range(factors.groups):
        a_sum = 0
        b_sum = 0
        for i in range(n):
            xs = [torch.cat([x_nt[i, s, g], x_nt.new_ones(1)]) if has_bias else x_nt[i, s, g]
                  for s in range(t)]
            zs = [z_nt[i, s, g] for s in range(t)]
            if mode == "expand":
                a_sum = a_sum + sum(torch.outer(v, v) for v in xs) / (n * t)
                b_sum = b_sum + sum(torch.outer(v, v) for v in zs) / n
            else:
                xm, zsum = sum(xs) / t, sum(zs)
                a_sum = a_sum + torch.outer(xm, xm) / n
                b_sum = b_sum + torch.outer(zsum, zsum) / n
        assert_close(factors.input_cov[g], a_sum, what="input factor")
        assert_close(factors.grad_cov[g], b_sum, what="output-gradient factor")


@st.composite
def one_position_cases(draw):
    """Linear with size-1 extra dims, or a convolution whose kernel covers the whole input."""
    seed = draw(seeds())
    bias = draw(st.booleans())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if draw(st.booleans()):
            extra = (1,) * draw(st.integers(0, 2))
            d_in, d_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            module = nn.Linear(d_in, d_out, bias=bias).double()
            x = torch.randn(1, *extra, d_in, dtype=torch.float64)
        else:
            dim = draw(st.integers(1, 3))
            groups = draw(st.integers(1, 2))
            kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
            dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
            module = conv(groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2)),
                          kernel, stride=draw(st.integers(1, 2)), dilation=dilation,
                          groups=groups, bias=bias).double()
            side = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
            x = torch.randn(1, module.in_channels, *side, dtype=torch.float64)
    return module, x


@given(case=one_position_cases(), seed=seeds())
def test_kfac_is_exact_for_one_sample_at_one_position(case, seed):
    """With N = 1 and T = 1, ``B ⊗ A`` is exactly ``g gᵀ`` (parameter order, bias included),
    block-diagonal over a convolution's groups."""
    module, x = case
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = module(x)
    z = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    call = Call((x,), {}, out, z, out._version)
    plugin = plugin_for(module)
    assert plugin.patches(module, call)[0].shape[1] == 1
    grads = plugin.per_sample_grads(module, [call])
    g = torch.cat([grads[k].reshape(-1) for k in ("weight", "bias") if k in grads])
    factors = plugin.kfac_factors(module, [call])
    mask = _group_mask(module) if isinstance(module, nn.modules.conv._ConvNd) else 1.0
    assert_close(factors.dense(), torch.outer(g, g) * mask)


def test_kfac_dense_for_grouped_convolution_matches_structure():
    conv = nn.Conv2d(4, 4, 1, groups=2).double()
    x = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    calls = _calls(conv, x)
    factors = Conv2dPlugin().kfac_factors(conv, calls)
    assert factors.input_cov.shape == (2, 3, 3) and factors.grad_cov.shape == (2, 2, 2)
    dense = factors.dense()
    g = Conv2dPlugin().per_sample_grads(conv, calls)
    flat = torch.cat([g["weight"].reshape(-1), g["bias"].reshape(-1)])
    assert_close(dense, torch.outer(flat, flat) * (_group_mask(conv)))
    with pytest.raises(ValueError, match=r"expand.*reduce"):
        Conv2dPlugin().kfac_factors(conv, calls, mode="other")


def _group_mask(conv):
    """1 where two parameter entries belong to the same group, else 0."""
    out = conv.out_channels
    per = out // conv.groups
    w_per_out = conv.weight[0].numel()
    biases = range(out) if conv.bias is not None else []
    owner = [o // per for o in range(out) for _ in range(w_per_out)] + [o // per for o in biases]
    owner = torch.tensor(owner)
    return (owner[:, None] == owner[None, :]).double()


def test_layer_plugin_is_abstract_and_documented():
    with pytest.raises(TypeError):
        LayerPlugin()
    for cls in (LinearPlugin, Conv1dPlugin, Conv2dPlugin, Conv3dPlugin, GenericPlugin):
        assert cls.__doc__
        for name in ("per_sample_grads", "gram", "weighted_grads", "row_dots", "kfac_factors"):
            assert getattr(cls, name).__doc__, f"{cls.__name__}.{name} has no docstring"


def test_keyword_only_calls_and_nothing_to_factorise():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, *, x, mask):
            return x * self.weight * mask

    gate = Gate()
    x = torch.randn(4, 3, dtype=torch.float64)
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # not batched
    with Capture([gate]) as cap:
        out = gate(x=x, mask=mask)
        cap.backward_to_outputs(out.square().sum())
    calls = cap.calls[gate]
    assert calls[0].batch_size == 4
    grads = GenericPlugin().per_sample_grads(gate, calls)
    assert_close(grads["weight"], 2 * (x * gate.weight * mask) * x * mask)
    lin = nn.Linear(2, 2).double().requires_grad_(False)
    with torch.no_grad():
        out = lin(torch.ones(1, 2, dtype=torch.float64))
    call = Call((torch.ones(1, 2, dtype=torch.float64),), {}, out, torch.ones_like(out))
    with pytest.raises(LayerPluginError, match="nothing to factorise"):
        LinearPlugin().kfac_factors(lin, [call])
