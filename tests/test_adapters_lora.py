"""LoRA on every model family: the formula, counts, its init, merge, scaling, and bad sizes."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import FAMILIES, TINY_CONFIGS, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from workers.adapters.base import adapter_parameters
from workers.adapters.lora import LoraLinear, merge_lora, unmerge_lora
from workers.adapters.registry import ParamCounts, count_parameters, inject
from workers.errors import ConfigError
from workers.model_loading import build_model
from workers.placement import family_for
from workers.spec import parse_trial_spec

IDS = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(0))
RANK = 4


def lora(placement: list[str], **fields):
    spec = {"type": "lora", "placement": placement, "rank": RANK, "dropout": 0.0, **fields}
    return parse_trial_spec({"model": "unused", "adapter": spec}).adapter


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def perturb_b(model: nn.Module, std: float = 0.1) -> None:
    """Move every B off zero, so the update is no longer the identity."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * std)


def in_out(family: str) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear role of a tiny model, from its config; a fused qkv linear is `qkv`."""
    c = TINY_CONFIGS[family]
    d = c.hidden_size
    f = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None) or 4 * d
    kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * (d // c.num_attention_heads)
    return {"q": (d, d), "k": (d, kv), "v": (d, kv), "qkv": (d, 3 * d), "o": (d, d),
            "gate": (d, f), "up": (d, f), "down": (f, d)}


PLACEMENTS = {
    "qkvud": ["q", "k", "v", "up", "down"],
    "attn": ["attn"],
    "mlp": ["mlp"],
    "o-down": ["o", "down"],
}


def wrapped_roles(name: str, family: str) -> list[str]:
    """The linears each placement wraps per block: sublayers mean the linears the family has."""
    layout = family_for(TINY_CONFIGS[family])
    qkv = ["qkv"] if layout.fused_qkv else ["q", "k", "v"]
    return {
        "qkvud": [*qkv, "up", "down"],
        "attn": [*qkv, "o"],
        "mlp": ["gate", "up", "down"] if layout.has("gate") else ["up", "down"],
        "o-down": ["o", "down"],
    }[name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_counts_are_r_times_in_plus_out_per_wrapped_linear(name: str, family: str) -> None:
    model = tiny_model(family)
    base = sum(p.numel() for p in model.parameters())
    inject(model, lora(PLACEMENTS[name]))
    dims, layers = in_out(family), TINY_CONFIGS[family].num_hidden_layers
    expected = layers * sum(RANK * sum(dims[r]) for r in wrapped_roles(name, family))
    assert count_parameters(model) == ParamCounts(trainable=expected, base=base)
    assert len(lora_layers(model)) == layers * len(wrapped_roles(name, family))


@pytest.mark.parametrize("family", FAMILIES)
def test_only_b_learns_while_b_is_zero(family: str) -> None:
    """Identity at init and only-the-adapter-trains are the contract of every method: test_adapters.py."""
    model = tiny_model(family)
    inject(model, lora(["attn", "mlp"], dropout=0.05))
    names = {n for n, _ in adapter_parameters(model)}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    # While B = 0, dL/dA = s B^T (...) = 0: only B learns on the first step.
    assert all(p.grad.abs().sum() > 0 for n, p in adapter_parameters(model) if ".lora_B." in n)
    assert all(p.grad.abs().sum() == 0 for n, p in adapter_parameters(model) if ".lora_A." in n)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])  # Linear without and with bias, Conv1D
@pytest.mark.parametrize("rslora", [False, True])
def test_each_layer_computes_w_x_plus_s_b_a_x(family: str, rslora: bool) -> None:
    model = tiny_model(family)
    inject(model, lora(["attn", "mlp"], alpha=6.0, rslora=rslora))
    perturb_b(model)
    s = 6.0 / (math.sqrt(RANK) if rslora else RANK)
    for layer in lora_layers(model).values():
        assert layer.scaling == pytest.approx(s)
        base = layer.base_layer
        w = base.weight.T if isinstance(base, Conv1D) else base.weight  # (out, in)
        x = torch.randn(3, w.shape[1])
        bias = base.bias if base.bias is not None else 0.0
        expected = x @ w.T + bias + s * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_a_starts_kaiming_uniform_and_b_at_zero() -> None:
    model = tiny_model("llama")
    inject(model, lora(["down"]))
    for layer in lora_layers(model).values():
        a = layer.lora_A.weight
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(in), 1/sqrt(in)), as PEFT
        assert 0.9 * bound < a.abs().max() <= bound
        assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_dropout_acts_on_the_lora_input_in_training_only() -> None:
    model = tiny_model("llama")
    inject(model, lora(["q"], dropout=0.5))
    layer = next(iter(lora_layers(model).values()))
    perturb_b(model)
    x = torch.randn(4, 64)
    low_rank = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    torch.testing.assert_close(layer.eval()(x), layer.base_layer(x) + x @ low_rank.T)
    torch.manual_seed(0)
    trained = layer.train()(x)
    torch.manual_seed(0)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(trained, layer.base_layer(x) + dropped @ low_rank.T)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_folds_the_update_into_w_and_unmerge_restores_it(family: str) -> None:
    model = tiny_model(family)
    inject(model, lora(["attn", "mlp"], rslora=True))
    perturb_b(model)
    layers = lora_layers(model)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    unmerged = model(IDS).logits
    merge_lora(model)
    for name, layer in layers.items():
        update = layer.scaling * layer.lora_B.weight @ layer.lora_A.weight  # (out, in)
        update = update.T if isinstance(layer.base_layer, Conv1D) else update
        torch.testing.assert_close(layer.base_layer.weight, before[name] + update)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    merge_lora(model)  # merging twice changes nothing
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_alpha_defaults_to_twice_the_rank_and_rslora_divides_by_sqrt_r() -> None:
    assert lora(["q"], rank=32).scaling == 2.0
    assert lora(["q"], rank=32, alpha=64).scaling == 2.0
    assert lora(["q"], rank=16, alpha=16).scaling == 1.0
    assert lora(["q"], rank=16, alpha=16, rslora=True).scaling == 4.0


def test_short_name() -> None:
    assert lora(["q", "k", "v", "up", "down"], rank=32).short_name() == "lora-r32-qkvud"


@pytest.mark.parametrize(
    ("family", "placement", "rank", "field", "needle"),
    [
        ("llama", ["up", "down"], 65, "adapter.rank", "model.layers.0.mlp.up_proj"),  # min(64, 160) = 64
        ("llama", ["q", "k"], 33, "adapter.rank", "model.layers.0.self_attn.k_proj"),  # GQA: k is 64 -> 32
        ("opt", ["q"], 65, "adapter.rank", "model.decoder.layers.0.self_attn.q_proj"),
        ("gpt2", ["o"], 65, "adapter.rank", "transformer.h.0.attn.c_proj"),
        ("bloom", ["q", "k"], 4, "adapter.placement", "fuses q, k and v"),
        ("gpt_neox", ["gate"], 4, "adapter.placement", "has no 'gate'"),
    ],
)
def test_what_a_model_cannot_take_fails_before_it_changes(family, placement, rank, field, needle) -> None:
    model = tiny_model(family)
    with pytest.raises(ConfigError) as err:
        inject(model, lora(placement, rank=rank))
    assert err.value.field == field and needle in str(err.value)
    assert not lora_layers(model)


def test_a_rank_equal_to_the_smallest_side_is_allowed() -> None:
    model = tiny_model("llama")
    inject(model, lora(["k"], rank=32))
    assert len(lora_layers(model)) == 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(placement=[]), "adapter.placement"),
        (dict(placement=["q"], rank=0), "adapter.rank"),
        (dict(placement=["q"], alpha=0), "adapter.alpha"),
        (dict(placement=["q"], dropout=1.0), "adapter.dropout"),
        (dict(placement=["q"], bottleneck=8), "adapter.bottleneck"),
        (dict(placement=["qkv"]), "adapter.placement.0"),
    ],
)
def test_bad_fields_fail_at_the_door(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        lora(**fields)
    assert err.value.field == field


def test_llama_7b_paper_count_on_meta(model_configs) -> None:
    model = build_model(str(model_configs / "llama-7b"), device="meta")
    inject(model, lora(["q", "k", "v", "up", "down"], rank=32, alpha=64))
    assert count_parameters(model).trainable == 56_098_816
    assert all(p.is_meta for _, p in adapter_parameters(model))
