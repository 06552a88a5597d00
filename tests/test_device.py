"""Oracles and likelihoods follow the data's device (CUDA runs only where a GPU exists)."""

import pytest
import torch

from curvlib.testing import oracles
from curvlib.testing.assertions import assert_close
from curvlib.testing.strategies import ModelSpec, Problem


@pytest.mark.cuda
@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_oracles_on_cuda_match_cpu(likelihood):
    p = Problem.make(ModelSpec("cnn1d", (2, 5), (3,), 3, "tanh", seed=0), likelihood, 4, 1)
    cuda = torch.device("cuda")
    model, x, y = p.model.to(cuda), p.inputs.to(cuda), p.targets.to(cuda)
    for fn, args in ((oracles.exact_fisher, (x,)), (oracles.empirical_fisher, (x, y)),
                     (oracles.gram, (x, y))):
        got = fn(model, likelihood, *args)
        assert got.device.type == "cuda"
        assert_close(got.cpu(), fn(p.model.cpu(), likelihood, *(a.cpu() for a in args)),
                     rtol=1e-10)
        model.to(cuda)
    gen = torch.Generator(device=cuda).manual_seed(0)
    assert oracles.mc_fisher(model, likelihood, x, 2, gen).device.type == "cuda"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["mlp", "cnn1d", "cnn2d"])
def test_plugins_and_sources_on_cuda_match_cpu(kind):
    """Per-sample gradients, Gram (opt_einsum contractions on the GPU) and weighted gradients
    stay on the parameters' device and agree with the CPU in float64."""
    import curvlib
    from curvlib.capture import Capture
    from curvlib.likelihoods import as_likelihood
    from curvlib.sources import Empirical, TrueFisher

    in_shape = {"mlp": (4,), "cnn1d": (2, 6), "cnn2d": (2, 5, 5)}[kind]
    p = Problem.make(ModelSpec(kind, in_shape, (3,), 3, "tanh", seed=0), "categorical", 6, 1)
    cuda = torch.device("cuda")
    cpu_model = p.model
    gpu_model = Problem.make(ModelSpec(kind, in_shape, (3,), 3, "tanh", seed=0),
                             "categorical", 6, 1).model.to(cuda)
    x, y = p.inputs.to(cuda), p.targets.to(cuda)
    for helper in (curvlib.per_sample_grads, curvlib.gram):
        got = helper(gpu_model, "categorical", x, y)
        ref = helper(cpu_model, "categorical", p.inputs, p.targets)
        for name in ref:
            assert got[name].device.type == "cuda"
            assert_close(got[name].cpu(), ref[name])
    lik = as_likelihood("categorical")
    c = torch.linspace(-1, 1, 6, dtype=torch.float64)
    with Capture(gpu_model) as cap:
        stats = Empirical().collect(gpu_model, lik, gpu_model(x), y, capture=cap)
    with Capture(cpu_model) as cap:
        ref_stats = Empirical().collect(cpu_model, lik, cpu_model(p.inputs), p.targets,
                                        capture=cap)
    got, ref = stats.weighted_grads(c.to(cuda)), ref_stats.weighted_grads(c)
    for name in ref:
        assert_close(got[name].cpu(), ref[name])
    gen = torch.Generator(device=cuda).manual_seed(0)
    out = gpu_model(x)
    batch = TrueFisher(num_samples=2).collect(gpu_model, lik, out, None, generator=gen)
    assert all(g.device.type == "cuda" for g in batch.batch_grads().values())


@pytest.mark.cuda
@pytest.mark.parametrize("structure, solver, rtol", [
    ("tensor_normal", "cholesky", 1e-10), ("kfac", "cholesky", 1e-10),
    ("dense", "cholesky", 1e-10), ("diagonal", "cholesky", 1e-10),
    ("diagonal_per_sample", "cholesky", 1e-10),
    # inverse roots: eigh's round-off differs between the devices' LAPACK and cuSOLVER, the
    # Newton iteration stops at ‖A_j − I‖ < 1e-12 on each
    ("shampoo", "eigh", 1e-9), ("shampoo", "newton", 1e-7)])
def test_vector_structure_steps_on_cuda_match_cpu(structure, solver, rtol):
    """State follows the parameters' device (GPU contractions, batched GPU solves); float64
    steps of every vector structure agree with the CPU."""
    import curvlib
    from curvlib.structures import Diagonal

    if structure == "diagonal_per_sample":
        structure = Diagonal(statistics="per_sample")
    spec = ModelSpec("cnn2d", (2, 5, 5), (3,), 3, "tanh", seed=0)
    results = []
    for device in ("cpu", "cuda"):
        p = Problem.make(spec, "categorical", 6, 1)
        model = p.model.to(device)
        x, y = p.inputs.to(device), p.targets.to(device)
        gen = torch.Generator(device=device).manual_seed(0)
        # empirical statistics: no sampling, so CPU and GPU see the same numbers
        opt = curvlib.assemble(model, "categorical", source="empirical",
                               structure=structure, solver=solver, lr=0.1, damping=0.1,
                               generator=gen)
        for _ in range(3):
            opt.zero_grad()
            opt.backward(model(x), y)
            opt.step()
        for state in opt.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    assert value.device.type == device
        results.append([q.detach().cpu() for q in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert_close(b, a, rtol=rtol)


@pytest.mark.cuda
@pytest.mark.parametrize("key", ["position", "sample"])
def test_fngd_steps_on_cuda_match_cpu(key):
    """FNGD's stored coefficients and every refresh and shared step stay on the parameters'
    device and agree with the CPU in float64."""
    import curvlib

    spec = ModelSpec("cnn2d", (2, 5, 5), (3,), 3, "tanh", seed=0)
    results = []
    for device in ("cpu", "cuda"):
        p = Problem.make(spec, "categorical", 6, 1)
        model = p.model.to(device)
        x, y = p.inputs.to(device), p.targets.to(device)
        opt = curvlib.FNGD(model, "categorical", lr=0.1, alpha=0.5, steps_per_epoch=2, key=key)
        for t in range(4):
            opt.zero_grad()
            ids = torch.arange(6) + 6 * (t % 2) if key == "sample" else None
            opt.backward(model(x), y, sample_ids=ids)
            opt.step()
        table = (opt.structure_state["positions"][0]["coefficients"] if key == "position"
                 else opt.structure_state["samples"]["coefficients"])
        assert all(c.device.type == device for c in table.values())
        results.append([q.detach().cpu() for q in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert_close(b, a, rtol=1e-10)
