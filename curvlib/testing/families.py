r"""Model families beyond the MLP/CNN specs, drawn by hypothesis: the correctness contract's.

Each family is a way real models use their parameters that a per-layer capture can miss:

* ``"functional"`` — a registered ``nn.Linear`` whose weight is used again through
  ``F.linear`` (a use outside the layer's own call);
* ``"tied"`` — an LM-style head tied to the embedding (``head.weight = emb.weight``), the
  Linear registered first (one parameter, two owners);
* ``"attention"`` — ``nn.MultiheadAttention``, whose ``out_proj`` forward is never called (its
  weight is read by ``F.multi_head_attention_forward``);
* ``"encoder"`` — an ``nn.TransformerEncoderLayer`` in eval mode (attention, LayerNorm, an MLP);
* ``"mlp"`` — a plain Linear–Tanh–Linear network, the family every component handles.

:func:`family_cases` draws a :class:`FamilyCase` — the family, its sizes, a batch size and a
seed — and builds the float64 model, inputs and categorical targets from the seed, so a failing
example prints as a short configuration. The contract (``tests/test_contract.py``) states what
each recipe does on each family: equal to the dense reference, or refused before any state
changes.

This module imports :mod:`hypothesis` (the ``test`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FAMILIES", "FamilyCase", "family_cases"]

#: the families :func:`family_cases` draws from
FAMILIES = ("functional", "tied", "attention", "encoder", "mlp")


class FunctionalReuse(nn.Module):
    """``lin2.weight`` is used by ``lin2`` and again through ``F.linear``."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(3, width), nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin1(x))
        return self.lin2(h) + 0.5 * F.linear(h, self.lin2.weight)


class TiedLM(nn.Module):
    """An LM-style head tied to the embedding, the Linear registered first."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, vocab, bias=False)
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (its ``out_proj`` forward is never called), then a Linear."""

    def __init__(self, dim: int, heads: int, classes: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.out(h.mean(1))


class Encoder(nn.Module):
    """A ``TransformerEncoderLayer`` (no dropout) and a Linear head."""

    def __init__(self, dim: int, heads: int, classes: int):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim + 2,
                                                dropout=0.0, batch_first=True)
        self.out = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.layer(x).mean(1))


@dataclass(frozen=True)
class FamilyCase:
    """A drawn member of a family: its sizes, batch size and seed (the numbers come from the
    seed). ``model``, ``inputs`` and ``targets`` are built once, in float64."""

    family: str
    width: int  # hidden width / embedding or attention dimension
    heads: int
    classes: int  # output classes (the vocabulary for "tied")
    length: int  # sequence length ("attention", "encoder")
    batch_size: int
    seed: int
    model: nn.Module = field(init=False, repr=False, compare=False)
    inputs: Tensor = field(init=False, repr=False, compare=False)
    targets: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        model, inputs, targets = self.build()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "targets", targets)

    def new_model(self) -> nn.Module:
        """A fresh copy of the model, with the same initial parameters."""
        return self.build()[0]

    def batch(self, seed: int, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Another batch of inputs and targets for the model, from ``seed``."""
        return self._data(torch.Generator().manual_seed(seed), batch_size or self.batch_size)

    def build(self) -> tuple[nn.Module, Tensor, Tensor]:
        """(model, inputs, targets), float64; the same every call."""
        torch.manual_seed(self.seed)  # the modules' own initialisation draws from it
        w, c = self.width, self.classes
        if self.family == "functional":
            model: nn.Module = FunctionalReuse(w, c)
        elif self.family == "tied":
            model = TiedLM(c, w)
        elif self.family == "attention":
            model = Attention(w, self.heads, c)
        elif self.family == "encoder":
            model = Encoder(w, self.heads, c).eval()
        elif self.family == "mlp":
            model = nn.Sequential(nn.Linear(3, w), nn.Tanh(), nn.Linear(w, c))
        else:
            raise ValueError(f"unknown family {self.family!r}; known: {FAMILIES}")
        model = model.to(torch.float64)
        inputs, targets = self._data(torch.Generator().manual_seed(self.seed + 1),
                                     self.batch_size)
        return model, inputs, targets

    def _data(self, gen: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
        if self.family == "tied":
            inputs = torch.randint(0, self.classes, (n,), generator=gen)
        elif self.family in ("attention", "encoder"):
            inputs = torch.randn(n, self.length, self.width, generator=gen, dtype=torch.float64)
        else:
            inputs = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        return inputs, torch.randint(0, self.classes, (n,), generator=gen)


@st.composite
def family_cases(draw: st.DrawFn, families: tuple[str, ...] = FAMILIES,
                 min_batch: int = 1, max_batch: int = 5) -> FamilyCase:
    """A :class:`FamilyCase` of one of ``families``: widths 2–4 (attention: 3, or 4 with 1 or
    2 heads), 2–4 classes, sequences of 1–3 tokens, ``min_batch``–``max_batch`` samples."""
    family = draw(st.sampled_from(families), label="family")
    if family in ("attention", "encoder"):
        # not 2 wide: the encoder's LayerNorm over two features is ±d/√(d² + ε), whose
        # gradients are differences of near-equal terms with few exact digits in float64
        width = draw(st.sampled_from((3, 4)))
        heads = draw(st.sampled_from((1, 2))) if width == 4 else 1
    else:
        heads, width = 1, draw(st.integers(2, 4))
    return FamilyCase(family=family, width=width, heads=heads,
                      classes=draw(st.integers(2, 4)), length=draw(st.integers(1, 3)),
                      batch_size=draw(st.integers(min_batch, max_batch)),
                      seed=draw(st.integers(0, 2**16)))
