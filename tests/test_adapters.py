"""The adapter family on every model family: the specification of issue 3, as tests."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, TINY_CONFIGS, tiny_model

from workers.adapters.base import adapter_parameters
from workers.adapters.bottleneck import ParallelExit, Tap
from workers.adapters.io import export_peft, load_adapter, save_adapter
from workers.adapters.lora import LoraLinear, merge_lora, unmerge_lora
from workers.adapters.mosa import SparseBottleneck, merge_mosa, set_active_part
from workers.adapters.registry import count_parameters, inject
from workers.errors import ConfigError
from workers.spec import parse_trial_spec

torch.set_grad_enabled(True)


def adapter(**fields):
    return parse_trial_spec({"model": "unused", "adapter": fields}).adapter


def dims(family: str) -> tuple[int, int, int]:
    """(hidden d, MLP width f, layers L) of a tiny model."""
    model = tiny_model(family)
    c = model.config
    f = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None)
    return c.hidden_size, f or 4 * c.hidden_size, c.num_hidden_layers


IDS = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(0))

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


def expected_count(name: str, family: str) -> int:
    """Closed-form trainable parameters of each configuration above on a tiny model."""
    d, f, layers = dims(family)
    c = TINY_CONFIGS[family]
    fused = family in ("bloom", "gpt2", "gpt_neox")
    b, r, n = 8, 4, 5
    kv = (getattr(c, "num_key_value_heads", None) or c.num_attention_heads) * (d // c.num_attention_heads)
    qkv_in_out = [(d, 3 * d)] if fused else [(d, d), (d, kv), (d, kv)]
    per_layer = {
        "series-attn-mlp": 2 * (2 * d * b),
        "series-up-down": 2 * (2 * d * b),
        "series-qkv": (1 if fused else 3) * 2 * d * b,
        "parallel-attn-mlp": 2 * (2 * d * b),
        "parallel-up-down": b * (d + f) + b * (f + d),
        "mosa-series-mlp": 2 * d * b,
        "mosa-parallel-attn": 2 * d * b,
        "lora-qkvud": sum(r * (i + o) for i, o in qkv_in_out) + 2 * r * (d + f),
        "lora-attn": sum(r * (i + o) for i, o in qkv_in_out) + r * 2 * d,
        "prefix": n * 2 * kv,
    }
    if name == "prefix-mlp":
        return n * d + (d * 16 + 16) + (16 * layers * 2 * kv + layers * 2 * kv)
    return layers * per_layer[name]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_forward_backward_train_only_the_adapter(name: str, family: str) -> None:
    model = tiny_model(family)
    inject(model, adapter(**METHODS[name]))
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in adapter_parameters(model)}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    # LoRA's A gets no gradient while B is still zero; every other adapter tensor does.
    silent = {n for n in trainable if "lora_A" in n}
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in trainable - silent)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(METHODS))
def test_counts_equal_the_closed_form(name: str, family: str) -> None:
    model = tiny_model(family)
    base = sum(p.numel() for p in model.parameters())
    inject(model, adapter(**METHODS[name]))
    counts = count_parameters(model)
    assert counts.trainable == expected_count(name, family)
    assert counts.base == base


def test_bias_and_learned_scaling_add_their_parameters() -> None:
    d, f, layers = dims("llama")
    model = tiny_model("llama")
    inject(model, adapter(type="parallel", placement=["up"], bottleneck=8, bias=True, scaling="learned"))
    assert count_parameters(model).trainable == layers * (8 * (d + f) + 8 + f + 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "name", ["series-attn-mlp", "series-up-down", "series-qkv", "parallel-attn-mlp", "parallel-up-down",
             "mosa-series-mlp", "mosa-parallel-attn", "lora-qkvud", "lora-attn"],
)
def test_zero_init_is_the_identity(name: str, family: str) -> None:
    base = tiny_model(family)
    model = tiny_model(family)
    fields = dict(METHODS[name])
    if fields["type"] != "lora":  # LoRA's B starts at zero whatever the init
        fields["init"] = "zero"
    inject(model, adapter(**fields))
    assert torch.equal(model(IDS).logits, base(IDS).logits)


@pytest.mark.parametrize("name", ["series-attn-mlp", "parallel-up-down", "mosa-series-mlp", "prefix"])
def test_paper_init_changes_the_output(name: str) -> None:
    base = tiny_model("llama")
    model = tiny_model("llama")
    inject(model, adapter(**METHODS[name]))
    assert not torch.allclose(model(IDS).logits, base(IDS).logits)


def test_series_residual_off_drops_the_skip() -> None:
    model = tiny_model("llama")
    inject(model, adapter(type="series", placement=["down"], bottleneck=8, init="zero", residual=False))
    wrapper = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(3, wrapper.base_layer.in_features)
    assert torch.equal(wrapper(x), torch.zeros(3, model.config.hidden_size))


def test_series_presets() -> None:
    assert adapter(type="series", preset="houlsby", bottleneck=8).placement == ["attn", "mlp"]
    assert adapter(type="series", preset="pfeiffer", bottleneck=8).placement == ["mlp"]


def test_parallel_tap_holds_nothing_after_a_forward() -> None:
    model = tiny_model("llama")
    inject(model, adapter(**METHODS["parallel-attn-mlp"]))
    model(IDS)
    taps = [m.tap for m in model.modules() if isinstance(m, ParallelExit)]
    assert len(taps) == 4 and all(isinstance(t, Tap) and t.value is None for t in taps)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        inject(model, adapter(**METHODS["parallel-attn-mlp"]))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapter_parameters(model)})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


# --- LoRA ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_merge_equals_unmerged_and_unmerge_restores(family: str) -> None:
    model = tiny_model(family)
    original = {n: p.clone() for n, p in model.named_parameters()}
    inject(model, adapter(type="lora", placement=["q", "k", "v", "o", "up", "down"], rank=4, dropout=0.0))
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    unmerged = model(IDS).logits
    merge_lora(model)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    for name, param in model.named_parameters():
        plain = name.replace(".base_layer", "")
        if plain in original:
            torch.testing.assert_close(param, original[plain], rtol=0, atol=1e-6)


def test_lora_scaling_and_rslora() -> None:
    assert adapter(type="lora", placement=["q"], rank=32, alpha=64).scaling == 2.0
    assert adapter(type="lora", placement=["q"], rank=16).scaling == 2.0  # alpha defaults to 2 r
    assert adapter(type="lora", placement=["q"], rank=16, alpha=16, rslora=True).scaling == pytest.approx(4.0)


# --- MoSA ----------------------------------------------------------------------------------------------------

def _mosa_model(base: str = "series") -> torch.nn.Module:
    model = tiny_model("llama")
    inject(model, adapter(type="mosa", base=base, placement=["attn", "mlp"], bottleneck=8, parts=4))
    return model


def test_mosa_parts_are_disjoint_and_cover_every_weight() -> None:
    layers = [m for m in _mosa_model().modules() if isinstance(m, SparseBottleneck)]
    assert layers
    for layer in layers:
        for which in ("down", "up"):
            masks = layer.part_masks(which)
            assert masks.shape[0] == 4
            assert torch.equal(masks.sum(0), torch.ones_like(masks[0]))
            assert all(masks[i].sum() > 0 for i in range(4))


@pytest.mark.parametrize("base", ["series", "parallel"])
def test_mosa_merged_adapter_equals_the_mixture_it_replaces(base: str) -> None:
    model = _mosa_model(base).eval()
    mixture = model(IDS).logits
    assert merge_mosa(model) == 4
    assert not any(isinstance(m, SparseBottleneck) for m in model.modules())
    torch.testing.assert_close(model(IDS).logits, mixture, rtol=0, atol=1e-6)


def test_mosa_training_step_updates_exactly_one_part() -> None:
    model = _mosa_model().train()
    set_active_part(model, 2)
    model(IDS, labels=IDS).loss.backward()
    for layer in (m for m in model.modules() if isinstance(m, SparseBottleneck)):
        for which in ("down", "up"):
            grad = getattr(layer, which).weight.grad
            outside = getattr(layer, f"{which}_part") != 2
            assert grad[outside].abs().sum() == 0
            assert grad[~outside].abs().sum() > 0


# --- prefix ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_generation_with_cache_equals_without(family: str, byte_tok) -> None:
    from workers.evaluate import generate_greedy

    model = tiny_model(family)
    inject(model, adapter(type="prefix", virtual_tokens=5))
    byte_tok.padding_side = "left"
    prompts = ["Hello world, this is", "Hi"]
    enc = byte_tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(**enc, use_cache=True, **kw)
    uncached = model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    ours, _ = generate_greedy(model, byte_tok, prompts, 8, batch_size=2)
    assert ours == cached[:, enc["input_ids"].shape[1]:].tolist()


# --- save, load, export ----------------------------------------------------------------------------------------

def _perturbed(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("family", ["llama", "bloom"])
@pytest.mark.parametrize("name", ["series-attn-mlp", "parallel-up-down", "mosa-series-mlp", "lora-qkvud", "prefix"])
def test_save_load_round_trip(name: str, family: str, tmp_path: Path) -> None:
    spec = adapter(**METHODS[name])
    model = tiny_model(family, seed=1)
    inject(model, spec)
    _perturbed(model)
    model.eval()
    expected = model(IDS).logits
    save_adapter(model, spec, tmp_path, base_model="tiny")
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter.safetensors"}
    fresh = tiny_model(family, seed=1)
    assert load_adapter(fresh, tmp_path) == spec
    assert torch.equal(fresh.eval()(IDS).logits, expected)


def test_saved_file_holds_only_adapter_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    spec = adapter(**METHODS["lora-qkvud"])
    model = tiny_model("llama")
    inject(model, spec)
    save_adapter(model, spec, tmp_path)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert sum(t.numel() for t in saved.values()) == count_parameters(model).trainable


def test_loading_into_a_mismatched_config_fails(tmp_path: Path) -> None:
    spec = adapter(**METHODS["lora-qkvud"])
    model = tiny_model("llama")
    inject(model, spec)
    save_adapter(model, spec, tmp_path)
    config = (tmp_path / "adapter_config.json").read_text().replace('"rank": 4', '"rank": 8')
    (tmp_path / "adapter_config.json").write_text(config)
    with pytest.raises((ConfigError, RuntimeError)):
        load_adapter(tiny_model("llama"), tmp_path)


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2", "opt"])
def test_peft_export_loads_in_peft_with_equal_logits(family: str, tmp_path: Path) -> None:
    from peft import PeftModel

    spec = adapter(type="lora", placement=["q", "k", "v", "up", "down"], rank=4, alpha=8, dropout=0.0)
    model = tiny_model(family)
    inject(model, spec)
    _perturbed(model)
    expected = model.eval()(IDS).logits
    export_peft(model, spec, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_model(family), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(IDS).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_export_refuses_other_methods(tmp_path: Path) -> None:
    spec = adapter(**METHODS["series-up-down"])
    model = tiny_model("llama")
    inject(model, spec)
    with pytest.raises(ConfigError, match="only LoRA"):
        export_peft(model, spec, tmp_path)


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("family", "fields", "field", "needle"),
    [
        ("llama", dict(type="series", placement=["down"], bottleneck=64), "adapter.bottleneck", "not smaller"),
        ("llama", dict(type="series", placement=["mlp", "down"], bottleneck=8), "adapter.placement", "same output"),
        ("bloom", dict(type="parallel", placement=["gate"], bottleneck=8), "adapter.placement", "has no 'gate'"),
        ("gpt2", dict(type="lora", placement=["k"], rank=4), "adapter.placement", "fuses q, k and v"),
        ("opt", dict(type="lora", placement=["q"], rank=65), "adapter.rank", "exceeds the layer"),
    ],
)
def test_placements_and_sizes_a_model_cannot_take(family, fields, field, needle) -> None:
    model = tiny_model(family)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError) as err:
        inject(model, adapter(**fields))
    assert err.value.field == field and needle in str(err.value)
    assert before.keys() <= {k.replace(".base_layer", "") for k in model.state_dict()}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(type="series", placement=["down"], bottleneck=8, rank=4), "adapter.rank"),
        (dict(type="series", preset="houlsby", placement=["mlp"], bottleneck=8), "adapter"),
        (dict(type="parallel", placement=["up"], bottleneck=8, residual=False), "adapter.residual"),
        (dict(type="prefix", virtual_tokens=4, placement=["attn"]), "adapter.placement"),
        (dict(type="lora", placement=[], rank=4), "adapter.placement"),
        (dict(type="mosa", placement=["mlp"], bottleneck=8, parts=1), "adapter.parts"),
        (dict(type="series", placement=["mlp", "mlp"], bottleneck=8), "adapter"),
        (dict(type="series", placement=["mlp"], bottleneck=8, activation="swish"), "adapter.activation"),
    ],
)
def test_fields_a_method_does_not_take_fail_at_the_door(fields, field) -> None:
    with pytest.raises(ConfigError) as err:
        adapter(**fields)
    assert err.value.field == field
