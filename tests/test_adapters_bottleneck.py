"""Series, parallel and MoSA adapters: placement, math, counts and MoSA's split & merge, as specifications."""

from __future__ import annotations

import copy
from functools import cache

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, TINY_CONFIGS, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from workers.adapters.base import adapter_parameters
from workers.adapters.bottleneck import (
    Bottleneck,
    InputAdapter,
    OutputAdapter,
    ParallelExit,
    ParallelLinear,
    TapEntry,
)
from workers.adapters.config import placement_tag
from workers.adapters.mosa import (
    SparseBottleneck,
    consistency_loss,
    merge_mosa,
    set_active_part,
    symmetric_kl,
)
from workers.adapters.registry import count_parameters, inject
from workers.errors import ConfigError
from workers.model_loading import build_model
from workers.placement import family_for
from workers.spec import parse_trial_spec

ALL_FAMILIES = (*FAMILIES, "mistral", "qwen2")
IDS = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))
B = 8  # the bottleneck of every tiny-model test: below every dimension (hidden 64, k/v 32)

# Placements every family honours, and `gate`, which only the LLaMA row has.
PLACEMENTS = (["attn"], ["mlp"], ["attn", "mlp"], ["q", "k", "v", "o"], ["up", "down"], ["gate", "up"])
MOSA_PLACEMENTS = (["attn", "mlp"], ["q", "k", "v", "o"], ["up", "down"])
METHODS = {"series": {"type": "series"}, "parallel": {"type": "parallel"},
           "mosa-series": {"type": "mosa", "base": "series"}, "mosa-parallel": {"type": "mosa", "base": "parallel"}}


def adapter(**fields):
    return parse_trial_spec({"model": "unused", "adapter": fields}).adapter


def cases() -> list:
    out = []
    for family in ALL_FAMILIES:
        has_gate = family_for(TINY_CONFIGS[family]).has("gate")
        for method in METHODS:
            for placement in MOSA_PLACEMENTS if method.startswith("mosa") else PLACEMENTS:
                if "gate" in placement and not has_gate:
                    continue
                out.append(pytest.param(method, family, placement, id=f"{method}-{family}-{'-'.join(placement)}"))
    return out


@cache
def base_logits(family: str) -> torch.Tensor:
    with torch.no_grad():
        return tiny_model(family)(IDS).logits


def with_adapter(family: str, method: str, placement: list[str], **fields) -> PreTrainedModel:
    model = tiny_model(family)
    inject(model, adapter(**METHODS[method], placement=placement, bottleneck=B, **fields))
    return model


# --- closed forms ------------------------------------------------------------------------------------------------

def role_dims(family: str) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear role, from the model config alone."""
    c = TINY_CONFIGS[family]
    d = c.hidden_size
    f = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None) or 4 * d
    heads = c.num_attention_heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * (d // heads)
    return {"q": (d, d), "k": (d, kv), "v": (d, kv), "qkv": (d, 3 * d), "o": (d, d),
            "gate": (d, f), "up": (d, f), "down": (f, d), "attn": (d, d), "mlp": (d, d)}


def expected_trainable(family: str, method: str, placement: list[str], b: int = B,
                       bias: bool = False, learned: bool = False) -> int:
    """Σ over blocks and sites: series 2·n·b on the width n it acts on, parallel b·(in + out)."""
    dims = role_dims(family)
    fused = family_for(TINY_CONFIGS[family]).fused_qkv is not None
    qkv = ("q", "k", "v")
    slots = [s for s in placement if not (fused and s in qkv)] + (["qkv"] if fused and "q" in placement else [])
    series = METHODS[method].get("base", method) == "series"
    total = 0
    for slot in slots:
        d_in, d_out = dims[slot]
        if series:
            n = d_in if slot in ("q", "k", "v", "qkv", "gate", "up") else d_out
            d_in = d_out = n
        total += b * (d_in + d_out) + (b + d_out if bias else 0) + (1 if learned else 0)
    return TINY_CONFIGS[family].num_hidden_layers * total


# --- every method x family x placement ------------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "family", "placement"), cases())
def test_its_size_is_the_closed_form_and_every_site_learns(method, family, placement) -> None:
    """Per placement: the sites it names, each in the computation. That only the adapter trains is
    every method's contract, on every family: test_adapters.py."""
    model = tiny_model(family)
    base = sum(p.numel() for p in model.parameters())
    inject(model, adapter(**METHODS[method], placement=placement, bottleneck=B))
    counts = count_parameters(model)
    assert (counts.trainable, counts.base) == (expected_trainable(family, method, placement), base)

    model(IDS).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in adapter_parameters(model))


@pytest.mark.parametrize(("method", "family", "placement"), cases())
def test_zero_init_is_the_identity_and_paper_init_is_not(method, family, placement) -> None:
    with torch.no_grad():
        assert torch.equal(with_adapter(family, method, placement, init="zero")(IDS).logits, base_logits(family))
        assert not torch.allclose(with_adapter(family, method, placement)(IDS).logits, base_logits(family))


@pytest.mark.parametrize("scaling", [1.0, "learned"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("method", "placement"), [("series", ["attn", "q", "up"]), ("parallel", ["mlp", "k", "down"])])
def test_bias_and_learned_scaling_add_their_parameters(method, placement, bias, scaling) -> None:
    model = with_adapter("llama", method, placement, bias=bias, scaling=scaling)
    expected = expected_trainable("llama", method, placement, bias=bias, learned=scaling == "learned")
    assert count_parameters(model).trainable == expected


# --- the math of each piece ---------------------------------------------------------------------------------------

ACTS = {"tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu}


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize(("bias", "scaling"), [(False, 1.0), (True, 0.5), (True, "learned")])
def test_bottleneck_is_its_formula(activation, bias, scaling) -> None:
    opts = adapter(type="series", placement=["mlp"], bottleneck=5, activation=activation, bias=bias, scaling=scaling)
    f = Bottleneck.build(opts, 12, 7, torch.empty(0, dtype=torch.float64))
    assert float(torch.as_tensor(f.scale).detach()) == (1.0 if scaling == "learned" else scaling)
    assert all(not lin.bias.any() for lin in (f.down, f.up)) if bias else f.down.bias is None
    with torch.no_grad():
        for p in f.parameters():
            p.normal_()
    x = torch.randn(3, 12, dtype=torch.float64)
    b_down, b_up = (f.down.bias, f.up.bias) if bias else (0.0, 0.0)
    expected = f.scale * (ACTS[activation](x @ f.down.weight.T + b_down) @ f.up.weight.T + b_up)
    torch.testing.assert_close(f(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and GPT-2's transposed Conv1D
@pytest.mark.parametrize("residual", [True, False])
def test_series_per_linear_forms(family, residual) -> None:
    model = tiny_model(family)
    layout = family_for(model.config)
    inject(model, adapter(type="series", placement=["up", "down"], bottleneck=B, residual=residual))
    block = f"{layout.layers}.0."
    up, down = model.get_submodule(block + layout.linears["up"]), model.get_submodule(block + layout.linears["down"])
    assert isinstance(up, InputAdapter) and isinstance(down, OutputAdapter)
    z, x = torch.randn(2, 64), torch.randn(2, role_dims(family)["down"][0])
    with torch.no_grad():
        f_z = up.adapter(z)
        torch.testing.assert_close(up(z), up.base_layer(z + f_z if residual else f_z))  # y = W (z + s·f(z))
        h = down.base_layer(x)
        torch.testing.assert_close(down(x), h + down.adapter(h) if residual else down.adapter(h))  # y = h + s·f(h)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_parallel_per_linear_form(family) -> None:
    model = tiny_model(family)
    layout = family_for(model.config)
    inject(model, adapter(type="parallel", placement=["up"], bottleneck=B))
    up = model.get_submodule(f"{layout.layers}.0.{layout.linears['up']}")
    assert isinstance(up, ParallelLinear)
    assert (up.adapter.down.in_features, up.adapter.up.out_features) == role_dims(family)["up"]
    z = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(up(z), up.base_layer(z) + up.adapter(z))  # y = W z + b + s·f(z)


@pytest.mark.parametrize("family", ["llama", "gptj", "gpt2", "gpt_neox"])  # families whose MLP is one module
@pytest.mark.parametrize("method", ["series", "parallel"])
def test_sublayer_forms_wrap_the_whole_mlp(family, method) -> None:
    """series: mlp'(x) = h + s·f(h), h = mlp(x); parallel: mlp'(x) = mlp(x) + s·f(x)."""
    original = tiny_model(family)
    model = copy.deepcopy(original)
    inject(model, adapter(type=method, placement=["mlp"], bottleneck=B))
    layout = family_for(model.config)
    exit_path = f"{layout.layers}.1.{layout.linears['down']}"
    mlp_path = exit_path.rpartition(".")[0]
    f = model.get_submodule(exit_path).adapter
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = original.get_submodule(mlp_path)(x)
        expected = h + f(h) if method == "series" else h + f(x)
        torch.testing.assert_close(model.get_submodule(mlp_path)(x), expected)


def test_a_parallel_sublayer_and_a_linear_of_it_stack() -> None:
    model = with_adapter("llama", "parallel", ["attn", "mlp", "q", "down"])
    entry = model.get_submodule("model.layers.0.self_attn.q_proj")
    exit_ = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(entry, TapEntry) and isinstance(entry.base_layer, ParallelLinear)
    assert isinstance(exit_, ParallelExit) and isinstance(exit_.base_layer, ParallelLinear)
    assert count_parameters(model).trainable == expected_trainable("llama", "parallel", ["attn", "mlp", "q", "down"])


# --- parallel's tap and gradient checkpointing --------------------------------------------------------------------

def _taps(model) -> list:
    return [m.tap for m in model.modules() if isinstance(m, ParallelExit)]


@pytest.mark.parametrize("method", ["parallel", "mosa-parallel"])
def test_checkpointing_gives_the_same_gradients_and_the_tap_ends_empty(method) -> None:
    grads = []
    for reentrant in (None, False, True):
        model = with_adapter("llama", method, ["attn", "mlp"]).train()
        if reentrant is not None:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        torch.manual_seed(7)  # MoSA draws its parts from the global RNG
        loss = model(IDS, labels=IDS).loss
        assert len(_taps(model)) == 4 and all(t.value is None for t in _taps(model))
        loss.backward()
        assert all(t.value is None for t in _taps(model))
        grads.append({n: p.grad for n, p in adapter_parameters(model)})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, grad in grads[0].items():
            torch.testing.assert_close(other[name], grad, rtol=1e-5, atol=1e-7)


# --- MoSA -----------------------------------------------------------------------------------------------------------

def _sparse(model) -> list[SparseBottleneck]:
    return [m for m in model.modules() if isinstance(m, SparseBottleneck)]


def test_mosa_parts_are_disjoint_balanced_cover_every_weight_and_follow_the_seed() -> None:
    def masks(seed: int) -> list[torch.Tensor]:
        model = with_adapter("llama", "mosa-series", ["attn", "mlp"], parts=4, mask_seed=seed)
        return [layer.part_masks(w) for layer in _sparse(model) for w in ("down", "up")]

    first = masks(0)
    assert len(first) == 2 * 2 * 2
    for m in first:
        assert m.shape[0] == 4 and set(m.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(m.sum(0), torch.ones_like(m[0]))  # disjoint and covering
        share = m.flatten(1).mean(1)
        assert ((share - 0.25).abs() < 0.1).all(), share
    assert not torch.equal(first[0], first[2])  # each layer its own split
    assert all(torch.equal(a, b) for a, b in zip(first, masks(0), strict=True))
    assert not torch.equal(first[0], masks(1)[0])


@pytest.mark.parametrize("base", ["series", "parallel"])
def test_merged_mosa_is_a_dense_adapter_with_the_same_outputs(base) -> None:
    model = with_adapter("llama", f"mosa-{base}", ["attn", "mlp", "up"]).eval()
    names = {n for n, _ in adapter_parameters(model)}
    with torch.no_grad():
        mixture = model(IDS).logits
        assert merge_mosa(model) == 2 * 3
        assert not _sparse(model)
        torch.testing.assert_close(model(IDS).logits, mixture, rtol=0, atol=1e-6)
    assert {n for n, _ in adapter_parameters(model)} == names
    assert not any("_part" in k for k in model.state_dict())


@pytest.mark.parametrize("fixed", [None, 3])
def test_a_training_forward_uses_exactly_one_part(fixed) -> None:
    model = with_adapter("llama", "mosa-parallel", ["attn", "mlp"], parts=4).train()
    set_active_part(model, fixed)
    torch.manual_seed(3)
    model(IDS, labels=IDS).loss.backward()
    used = []
    for layer in _sparse(model):
        for which in ("down", "up"):
            grad = getattr(layer, which).weight.grad
            touched = [i for i, m in enumerate(layer.part_masks(which)) if (grad * m).abs().sum() > 0]
            assert len(touched) == 1
            assert torch.equal(grad * (1 - layer.part_masks(which)[touched[0]]), torch.zeros_like(grad))
            used.append(touched[0])
        assert used[-1] == used[-2]  # both projections of one layer use the same part
    if fixed is None:
        assert len(set(used)) > 1  # each layer draws its own part
    else:
        assert set(used) == {fixed}


def test_mosa_part_draws_follow_torch_seed() -> None:
    def grads(seed: int) -> list[torch.Tensor]:
        model = with_adapter("llama", "mosa-series", ["attn", "mlp"]).train()
        torch.manual_seed(seed)
        model(IDS, labels=IDS).loss.backward()
        return [p.grad for _, p in adapter_parameters(model)]

    assert all(torch.equal(a, b) for a, b in zip(grads(5), grads(5), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(grads(5), grads(6), strict=True))


def test_set_active_part_rejects_a_part_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="4 parts"):
        set_active_part(with_adapter("llama", "mosa-series", ["mlp"], parts=4), 4)


def test_symmetric_kl_is_the_mean_of_both_kl_divergences() -> None:
    p, q = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    kl_pq = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    kl_qp = F.kl_div(F.log_softmax(p, -1), F.log_softmax(q, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(symmetric_kl(p, q), (kl_pq + kl_qp) / 2)
    assert torch.equal(symmetric_kl(p, p), torch.zeros(2, 3))


def test_consistency_loss_compares_two_sparse_forwards_on_scored_positions() -> None:
    model = with_adapter("llama", "mosa-series", ["attn", "mlp"], consistency_weight=0.5)
    labels = IDS.clone()
    labels[:, :4] = -100
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    with torch.no_grad():
        assert consistency_loss(model.eval(), batch) == 0  # all parts active: both forwards agree
    model.train()
    set_active_part(model, None)
    torch.manual_seed(0)
    loss = consistency_loss(model, batch)
    assert loss > 0
    loss.backward()
    assert all(p.grad is not None for _, p in adapter_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    # The same two forwards by hand: the loss averages the symmetric KL over the labelled positions.
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = model(IDS).logits, model(IDS).logits
    torch.testing.assert_close(loss.detach(), symmetric_kl(first, second)[:, 3:-1].mean())


# --- devices, dtypes, names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", list(METHODS))
def test_adapters_build_on_the_meta_device(method) -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(TINY_CONFIGS["bloom"])
    inject(model, adapter(**METHODS[method], placement=["attn", "mlp"], bottleneck=B, scaling="learned"))
    assert all(p.is_meta for _, p in adapter_parameters(model))
    assert count_parameters(model).trainable == expected_trainable("bloom", method, ["attn", "mlp"], learned=True)


@pytest.mark.parametrize("method", ["series", "mosa-parallel"])
def test_adapters_take_the_dtype_of_the_wrapped_linear(method) -> None:
    model = tiny_model("qwen2").to(torch.bfloat16)
    inject(model, adapter(**METHODS[method], placement=["attn", "down"], bottleneck=B, scaling="learned"))
    assert {p.dtype for _, p in adapter_parameters(model)} == {torch.bfloat16}
    assert model(IDS).logits.dtype == torch.bfloat16


def test_short_names() -> None:
    assert adapter(type="series", preset="houlsby", bottleneck=256).short_name() == "series-b256-attn-mlp"
    assert adapter(type="parallel", placement=["up", "down"], bottleneck=256).short_name() == "parallel-b256-ud"
    assert adapter(type="mosa", placement=["mlp"], bottleneck=64).short_name() == "mosa-series-b64-n4-mlp"
    assert (adapter(type="series", placement=["down", "attn"], bottleneck=16, residual=False, scaling="learned",
                    activation="relu", init="zero").short_name() == "series-b16-attn-d-relu-slearned-zinit-nores")
    assert placement_tag(["attn", "q", "k", "v", "gate", "up", "down"]) == "attn-qkvgud"
    # The two parallel forms under their own names: the reference's beside linears, He et al.'s beside a sublayer.
    assert adapter(type="parallel", placement=["mlp"], bottleneck=256).short_name() == "parallel-sublayer-b256-mlp"
    assert adapter(type="parallel", placement=["mlp", "q"], bottleneck=8).short_name() == "parallel-mixed-b8-mlp-q"
    assert placement_tag(["down", "q", "mlp", "attn"]) == "attn-mlp-qd"


def test_series_presets_stand_for_their_placements() -> None:
    assert adapter(type="series", preset="houlsby", bottleneck=8).placement == ["attn", "mlp"]
    assert adapter(type="series", preset="pfeiffer", bottleneck=8).placement == ["mlp"]


# --- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fields", "field", "needle"),
    [
        (dict(type="series", placement=["down"], bottleneck=0), "adapter.bottleneck", "greater than 0"),
        (dict(type="parallel", placement=["down"], bottleneck=-3), "adapter.bottleneck", "greater than 0"),
        (dict(type="series", placement=["ffn"], bottleneck=8), "adapter.placement.0", "'attn'"),
        (dict(type="series", preset="houlsby", placement=["mlp"], bottleneck=8), "adapter", "preset or placement"),
        (dict(type="series", preset="adapterp", bottleneck=8), "adapter", "unknown preset"),
        (dict(type="series", bottleneck=8), "adapter.placement", "required"),
        (dict(type="series", placement=["down"], bottleneck=8, rank=4), "adapter.rank", "does not take"),
        (dict(type="parallel", placement=["up"], bottleneck=8, residual=False), "adapter.residual", "does not take"),
        (dict(type="parallel", placement=["mlp"], form="linear", bottleneck=8), "adapter", "is the sublayer form"),
        (dict(type="parallel", placement=["up", "down"], form="sublayer", bottleneck=8), "adapter", "linear form"),
        (dict(type="mosa", placement=["mlp"], bottleneck=8, parts=1), "adapter.parts", "greater than or equal to 2"),
        (dict(type="mosa", placement=["mlp"], bottleneck=8, residual=False), "adapter.residual", "does not take"),
        (dict(type="series", placement=["mlp", "mlp"], bottleneck=8), "adapter", "names a slot twice"),
        (dict(type="series", placement=["mlp"], bottleneck=8, activation="swish"), "adapter.activation", "'tanh'"),
    ],
)
def test_bad_configs_fail_at_the_door(fields, field, needle) -> None:
    with pytest.raises(ConfigError) as err:
        adapter(**fields)
    assert err.value.field == field and needle in err.value.message


@pytest.mark.parametrize(
    ("family", "fields", "field", "needle"),
    [
        ("llama", dict(type="series", placement=["down"], bottleneck=64), "adapter.bottleneck",
         "not smaller than the dimension it compresses (64"),
        ("llama", dict(type="parallel", placement=["k"], bottleneck=32), "adapter.bottleneck", "(32 at"),
        ("opt", dict(type="mosa", base="parallel", placement=["attn"], bottleneck=64), "adapter.bottleneck", "(64"),
        ("bloom", dict(type="series", placement=["gate"], bottleneck=8), "adapter.placement",
         "family 'bloom' has no 'gate' linear; it has: attn, mlp, q, k, v, o, up, down"),
        ("gpt_neox", dict(type="parallel", placement=["k"], bottleneck=8), "adapter.placement", "fuses q, k and v"),
        ("llama", dict(type="series", placement=["attn", "o"], bottleneck=8), "adapter.placement", "same output"),
        ("gpt2", dict(type="mosa", placement=["mlp", "down"], bottleneck=8), "adapter.placement", "same output"),
    ],
)
def test_what_a_model_cannot_take_fails_and_leaves_it_unchanged(family, fields, field, needle) -> None:
    model = tiny_model(family)
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError) as err:
        inject(model, adapter(**fields))
    assert err.value.field == field and needle in err.value.message
    assert [type(m) for m in model.modules()] == modules


# --- the paper's LLaMA-7B counts, on the meta device ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fields", "trainable"),
    [
        (dict(type="series", placement=["down"], bottleneck=256), 67_108_864),
        (dict(type="series", placement=["gate", "up"], bottleneck=256), 134_217_728),
        (dict(type="parallel", placement=["up", "down"], bottleneck=256), 247_463_936),
    ],
)
def test_llama_7b_paper_counts(model_configs, fields, trainable) -> None:
    model = build_model(str(model_configs / "llama-7b"), device="meta")
    inject(model, adapter(**fields))
    counts = count_parameters(model)
    assert (counts.trainable, counts.base) == (trainable, 6_738_415_616)
    if fields["type"] == "parallel":
        assert round(counts.percent, 2) == 3.54


# --- sublayer bounds, dropout under recomputation, scaling values ----------------------------------------------------

def _record(module, store: dict, key: str, what: str) -> None:
    module.register_forward_hook(lambda mod, args, out: store.__setitem__(key, args[0] if what == "input" else out))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sublayer", ["attn", "mlp"])
def test_sublayer_adapters_sit_at_the_sublayer_bounds(family, sublayer) -> None:
    """series: exit output h -> h + s·f(h); parallel: exit output h -> h + s·f(z), z the entry linear's input."""
    layout = family_for(TINY_CONFIGS[family])
    entry_rel = layout.fused_qkv if sublayer == "attn" and layout.fused_qkv else layout.linears[
        {"attn": "q", "mlp": "up"}[sublayer]]
    block = f"{layout.layers}.1."
    entry, exit_ = block + entry_rel, block + layout.linears[{"attn": "o", "mlp": "down"}[sublayer]]

    series = with_adapter(family, "series", [sublayer])
    wrapper, seen = series.get_submodule(exit_), {}
    assert isinstance(wrapper, OutputAdapter)
    _record(wrapper.base_layer, seen, "h", "output")
    _record(wrapper, seen, "y", "output")
    with torch.no_grad():
        series(IDS)
        torch.testing.assert_close(seen["y"], seen["h"] + wrapper.adapter(seen["h"]))

    parallel = with_adapter(family, "parallel", [sublayer])
    tap_entry, wrapper, seen = parallel.get_submodule(entry), parallel.get_submodule(exit_), {}
    assert isinstance(tap_entry, TapEntry) and isinstance(wrapper, ParallelExit) and tap_entry.tap is wrapper.tap
    _record(tap_entry, seen, "z", "input")
    _record(wrapper.base_layer, seen, "h", "output")
    _record(wrapper, seen, "y", "output")
    with torch.no_grad():
        parallel(IDS)
        torch.testing.assert_close(seen["y"], seen["h"] + wrapper.adapter(seen["z"]))


def test_checkpointing_replays_mosa_dropout_and_part_draws() -> None:
    grads = []
    for checkpointing in (False, True):
        model = with_adapter("llama", "mosa-parallel", ["attn", "mlp"], dropout=0.1).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(11)
        model(IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in adapter_parameters(model)})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)


def test_consistency_loss_is_zero_when_both_forwards_use_the_same_part() -> None:
    model = with_adapter("llama", "mosa-series", ["attn", "mlp"]).train()
    set_active_part(model, 2)
    assert consistency_loss(model, {"input_ids": IDS, "labels": IDS}) == 0


@pytest.mark.parametrize("scaling", ["auto", True, None])
def test_scaling_is_a_number_or_learned(scaling) -> None:
    with pytest.raises(ConfigError) as err:
        adapter(type="series", placement=["mlp"], bottleneck=B, scaling=scaling)
    assert err.value.field == "adapter.scaling" and "a number or 'learned'" in err.value.message


@pytest.mark.parametrize("method", ["series", "parallel", "mosa-series"])
def test_float32_compute_as_the_reference(method) -> None:
    """compute_dtype float32: f(x) = cast_bf16(W_up · tanh(W_down · x)) · s, all in float32 inside."""
    model = tiny_model("llama").to(torch.bfloat16)
    inject(model, adapter(**METHODS[method], placement=["down"], bottleneck=B, scaling=2.0))
    layer = next(m for m in model.modules() if isinstance(m, Bottleneck))
    assert layer.float32 and layer.down.weight.dtype == torch.bfloat16
    x = torch.randn(3, layer.down.in_features, dtype=torch.bfloat16)
    layer.eval()
    inner = F.linear(torch.tanh(F.linear(x.float(), layer.down.weight.float())), layer.up.weight.float())
    expected = inner.to(torch.bfloat16) * 2.0
    assert torch.equal(layer(x), expected)
    bf16 = adapter(**METHODS[method], placement=["down"], bottleneck=B, scaling=2.0, compute_dtype="model")
    assert bf16.short_name().endswith("-s2-modeldtype")
    model = tiny_model("llama").to(torch.bfloat16)
    inject(model, bf16)
    layer = next(m for m in model.modules() if isinstance(m, Bottleneck))
    assert not layer.float32 and layer(x).dtype == torch.bfloat16
