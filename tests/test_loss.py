"""The chunked causal-LM loss equals the models' own loss, in value and in every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, tiny_model

from workers.adapters.config import CONFIGS
from workers.adapters.registry import inject
from workers.data import collate
from workers.loss import causal_lm_loss, linear_cross_entropy


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_cross_entropy_equals_full_logits(with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, generator=gen, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[::4] = -100
    plain = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100)
    expected = torch.autograd.grad(plain, [t for t in (hidden, weight, bias) if t is not None])
    chunked = linear_cross_entropy(hidden, weight, bias, labels, chunk=8)  # 28 labelled rows: 4 chunks
    got = torch.autograd.grad(chunked, [t for t in (hidden, weight, bias) if t is not None])
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_without_gradients_nothing_is_kept() -> None:
    hidden, weight = torch.randn(6, 4, requires_grad=True), torch.randn(9, 4)
    labels = torch.tensor([1, 2, -100, 3, 4, 5])
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, labels, chunk=2)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, labels))


def _batch(packed: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(3, 259, (n,), generator=gen).tolist()} for n in (9, 5, 7, 3)]
    for ex in examples:
        ex["labels"] = [-100] * 2 + ex["input_ids"][2:]  # the prompt's first tokens unlabelled
    rows = [[examples[0]], [examples[1], examples[3]], [examples[2]]] if packed else [[ex] for ex in examples]
    return collate(rows, pad_id=0)


@pytest.mark.parametrize(("family", "adapter"), [
    *[(f, {"type": "lora", "placement": ["attn", "mlp"], "rank": 4}) for f in FAMILIES],
    ("llama", {"type": "series", "placement": ["mlp"], "bottleneck": 8}),
    ("llama", {"type": "parallel", "placement": ["mlp"], "bottleneck": 8, "form": "sublayer"}),
    ("llama", {"type": "prefix", "virtual_tokens": 3}),
])
@pytest.mark.parametrize("packed", [False, True])
def test_causal_lm_loss_equals_the_models_loss(family: str, adapter: dict, packed: bool) -> None:
    if packed and family == "bloom":
        pytest.skip("BLOOM takes no packed rows")
    model = tiny_model(family)
    inject(model, CONFIGS[adapter["type"]].model_validate(adapter))
    for p in model.parameters():
        if p.requires_grad:  # LoRA's B starts at zero: give every adapter weight a gradient path
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    batch = _batch(packed)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)  # the same dropout masks on both paths
    plain = model(**batch).loss
    expected = torch.autograd.grad(plain, params)
    torch.manual_seed(0)
    chunked = causal_lm_loss(model, model, batch, chunk=5)
    got = torch.autograd.grad(chunked, params)
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
