"""The contract every adapter method keeps on every model family, as one method x family matrix.

Each method's own behaviour (its formula, counts, merge, bad sizes) is specified once, in its own file:
test_adapters_bottleneck.py (series, parallel, MoSA), test_adapters_lora.py, test_adapters_prefix.py,
and on disk in test_adapters_io.py."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from workers.adapters.base import adapter_parameters
from workers.adapters.registry import count_parameters, inject
from workers.spec import parse_trial_spec

torch.set_grad_enabled(True)

ALL_FAMILIES = (*FAMILIES, "mistral", "qwen2")  # every row of the family table
IDS = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(0))


def adapter(**fields):
    return parse_trial_spec({"model": "unused", "adapter": fields}).adapter


# Placements every family honours (no `gate`: bloom, opt, gptj, gpt2 and gpt_neox have none).
METHODS = {
    "series-attn-mlp": dict(type="series", placement=["attn", "mlp"], bottleneck=8),
    "series-up-down": dict(type="series", placement=["up", "down"], bottleneck=8),
    "series-qkv": dict(type="series", placement=["q", "k", "v"], bottleneck=8),
    "parallel-attn-mlp": dict(type="parallel", placement=["attn", "mlp"], bottleneck=8),
    "parallel-up-down": dict(type="parallel", placement=["up", "down"], bottleneck=8),
    "mosa-series-mlp": dict(type="mosa", placement=["mlp"], bottleneck=8),
    "mosa-parallel-attn": dict(type="mosa", base="parallel", placement=["attn"], bottleneck=8),
    "lora-qkvud": dict(type="lora", placement=["q", "k", "v", "up", "down"], rank=4),
    "lora-attn": dict(type="lora", placement=["attn"], rank=4),
    "prefix": dict(type="prefix", virtual_tokens=5),
    "prefix-mlp": dict(type="prefix", virtual_tokens=5, reparametrize=True, prefix_hidden=16),
}


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_only_the_adapter_trains_and_every_tensor_of_it_learns(name: str, family: str) -> None:
    model = tiny_model(family)
    base = sum(p.numel() for p in model.parameters())
    inject(model, adapter(**METHODS[name]))
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and trainable == {n for n, _ in adapter_parameters(model)}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    assert count_parameters(model).base == base  # the base is untouched, only wrapped
    # LoRA's A gets no gradient while B is still zero (test_adapters_lora); every other adapter tensor does.
    silent = {n for n in trainable if ".lora_A." in n}
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable - silent)


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_a_fresh_adapter_is_the_identity_except_a_prefix(name: str, family: str) -> None:
    """Zero init (`init: zero`; LoRA's B = 0 always) changes no logit; a prefix is tokens seen before, never nothing."""
    fields = dict(METHODS[name])
    if fields["type"] in ("series", "parallel", "mosa"):
        fields["init"] = "zero"
    model = tiny_model(family)
    inject(model, adapter(**fields))
    with torch.no_grad():
        ours, base = model(IDS).logits, tiny_model(family)(IDS).logits
    if fields["type"] == "prefix":
        assert not torch.allclose(ours, base, atol=1e-3)
    else:
        assert torch.equal(ours, base)


class Int8Linear(torch.nn.Linear):
    """A base linear as an 8-bit load leaves it (bitsandbytes' Linear8bitLt is an nn.Linear too): frozen int8
    weights with a scale per row, activations in and out in the model's dtype."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        scale = linear.weight.detach().abs().amax(1, keepdim=True).float() / 127
        self.weight = torch.nn.Parameter((linear.weight.detach().float() / scale).round().to(torch.int8),
                                         requires_grad=False)
        self.register_buffer("row_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.float() * self.row_scale).to(x.dtype)
        return torch.nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


@pytest.mark.parametrize("method", ["lora-qkvud", "series-attn-mlp", "parallel-up-down", "mosa-series-mlp"])
def test_every_method_trains_beside_an_8bit_base(method: str) -> None:
    """The paper trains on LLaMA loaded in 8 bits: the base's linears hold int8 weights, in which no adapter can be
    made (`requires_grad` on an int8 tensor is an error). Adapters beside them are float32, as PEFT's, and return
    to the model's dtype; at their initialisation the model is unchanged."""
    model = tiny_model("llama").to(torch.bfloat16)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, Int8Linear(module))
    ids = torch.randint(3, 259, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    inject(model, adapter(**METHODS[method], **({"init": "zero"} if "rank" not in METHODS[method] else {})))
    params = list(adapter_parameters(model))
    assert params and all(p.dtype == torch.float32 for _, p in params)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, before, rtol=0, atol=0)
    out.loss.backward()
    grads = [p.grad for _, p in params if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
