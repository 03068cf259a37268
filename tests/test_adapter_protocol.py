"""The adapter protocol: a method is its module, its config and one registry line, hooks and all.

`Toy` below is a whole method defined in this file alone, as a new method would be in its own
module: a config (with its plan), a layer, `inject`, an extra loss and a merge (`finalize`).
Registered with `registry.register`, it is accepted in a trial spec, checked and counted by the
pre-flight and `plan`, trained with its loss, merged and saved, and loaded back, without a line of the
pre-flight, the trainer, the job or io knowing its name.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from clirunner import run_cli
from safetensors.torch import load_file
from tiny_models import TINY_CONFIGS, tiny_model
from torch import nn

from orchestrator.preflight import check_trial
from workers.adapters.base import AdapterLayer, AdapterMethod, adapter_state_dict, linear_dims, replace_module
from workers.adapters.config import AdapterConfig, MosaConfig
from workers.adapters.io import load_adapter, save_adapter
from workers.adapters.mosa import consistency_loss
from workers.adapters.registry import (
    METHODS,
    enable_gradient_checkpointing,
    extra_loss,
    finalize,
    inject,
    register,
    state_dict,
    unregister,
)
from workers.data import collate
from workers.errors import ConfigError
from workers.job import run_trial
from workers.loss import causal_lm_loss
from workers.placement import FamilyLayout, ModelShape, linear_targets, resolve_linear_roles
from workers.spec import TrialSpec, parse_trial_spec
from workers.tracking import MemoryTracker, TrialStatus
from workers.train import Trainer

# --- the toy method: nothing of it lives outside this block ---------------------------------------


class ToyConfig(AdapterConfig):
    """Two shift vectors on every `down` output, pulled together by weight · Σ ||a - b||²."""

    type: Literal["toy"] = "toy"
    weight: float = 0.5
    merged: bool = False

    def short_name(self) -> str:
        return "toy-merged" if self.merged else "toy"

    def planned_parameters(self, layout: FamilyLayout, shape: ModelShape) -> int:
        """Two vectors (one once merged) of the output size of `down`, per block."""
        (role,) = resolve_linear_roles(layout, ["down"])
        return (1 if self.merged else 2) * shape.dims[role][1] * shape.layers


class ToyShift(AdapterLayer):
    """y = W x + a + b in training; y = W x + s once merged, s = a + b. Zero at init: the identity."""

    def __init__(self, base_layer: nn.Module, merged: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        d_out = linear_dims(base_layer)[1]
        for name in ("s",) if merged else ("a", "b"):
            self.register_parameter(name, nn.Parameter(torch.zeros(d_out, dtype=base_layer.weight.dtype)))

    def shift(self) -> torch.Tensor:
        return self.s if hasattr(self, "s") else self.a + self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.shift()


class Toy(AdapterMethod):
    name = "toy"
    config = ToyConfig

    def __init__(self) -> None:
        self.merged: dict[str, torch.Tensor] = {}  # what the last `finalize` produced, by parameter name

    def inject(self, model: nn.Module, layout: FamilyLayout, config: ToyConfig) -> list[nn.Module]:
        layers = []
        for target in linear_targets(model, layout, ["down"]):
            layer = ToyShift(model.get_submodule(target.path), config.merged)
            replace_module(model, target.path, layer)
            layers.append(layer)
        return layers

    def extra_loss(self, model: nn.Module, batch: dict[str, torch.Tensor], config: ToyConfig) -> torch.Tensor:
        return config.weight * sum(((m.a - m.b) ** 2).sum() for m in model.modules() if isinstance(m, ToyShift))

    def finalize(self, model: nn.Module, config: ToyConfig) -> AdapterConfig:
        self.merged = {}
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, ToyShift)]:
            merged = ToyShift(layer.base_layer, merged=True)
            with torch.no_grad():
                merged.s.copy_(layer.a + layer.b)
            replace_module(model, name, merged)
            self.merged[f"{name}.s"] = merged.s.detach().clone()
        return config.model_copy(update={"merged": True})


# --------------------------------------------------------------------------------------------------


@pytest.fixture
def toy() -> Iterator[Toy]:
    method = Toy()
    register(method)
    yield method
    unregister(method.name)


class _Engine(nn.Module):
    """What `Trainer._loss` uses of a DeepSpeed engine: calling it runs the model; `.module` is the model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, **inputs: torch.Tensor) -> object:
        return self.module(**inputs)


def _trainer(model: nn.Module, adapter: dict, zero_stage: int = 0) -> Trainer:
    """A trainer around `model` as far as `_loss` reads one: its engine and its (validated) spec."""
    trainer = Trainer.__new__(Trainer)
    trainer.engine = _Engine(model)
    trainer.spec = TrialSpec.model_validate({"model": "tiny", "adapter": adapter, "train": {"zero_stage": zero_stage}})
    return trainer


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    examples = [{"input_ids": torch.randint(3, 259, (n,), generator=gen).tolist()} for n in (9, 5, 7)]
    for ex in examples:
        ex["labels"] = [-100] * 2 + ex["input_ids"][2:]
    return collate([[ex] for ex in examples], pad_id=0)


def _randomised(model: nn.Module) -> nn.Module:
    """Every trainable (adapter) weight drawn from N(0, 0.05²): no term of a loss is zero by its init."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return model.train()


def test_the_trainers_loss_is_the_lm_loss_plus_the_methods_extra_loss(toy: Toy) -> None:
    model = tiny_model("llama")
    trainer = _trainer(model, {"type": "toy", "weight": 0.25})
    inject(model, trainer.spec.adapter)
    _randomised(model)
    batch = _batch()
    lm = causal_lm_loss(model, model, batch)
    penalty = sum(((m.a - m.b) ** 2).sum() for m in model.modules() if isinstance(m, ToyShift))
    assert penalty > 0
    torch.testing.assert_close(trainer._loss(batch), lm + 0.25 * penalty, rtol=0, atol=0)


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_the_mosa_consistency_loss_is_added_as_before(weight: float, zero_stage: int) -> None:
    """L = L_LM + λ · consistency_loss: the formula the trainer applied before the hooks, by hand."""
    model = tiny_model("llama")
    adapter = {"type": "mosa", "placement": ["attn", "mlp"], "bottleneck": 8, "consistency_weight": weight}
    trainer = _trainer(model, adapter, zero_stage)
    inject(model, trainer.spec.adapter)
    _randomised(model)
    batch = _batch()
    torch.manual_seed(0)  # the same draws of parts on both sides
    lm = model(**batch).loss if zero_stage == 3 else causal_lm_loss(model, model, batch)
    expected = lm + weight * consistency_loss(model, batch) if weight else lm
    torch.manual_seed(0)
    got = trainer._loss(batch)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if weight:
        torch.manual_seed(0)
        lm_only = model(**batch).loss if zero_stage == 3 else causal_lm_loss(model, model, batch)
        assert got > lm_only  # the term is there, and positive
    else:
        assert extra_loss(model, batch, MosaConfig.model_validate(adapter)) is None


def test_the_finalized_form_is_what_is_saved_and_loads_back(toy: Toy, tmp_path: Path) -> None:
    model = tiny_model("llama")
    trained_as = ToyConfig(weight=0.25)
    inject(model, trained_as)
    _randomised(model).eval()
    ids = torch.tensor([[5, 9, 30, 200, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    deployed = finalize(model, trained_as)
    assert deployed == ToyConfig(weight=0.25, merged=True)
    save_adapter(model, deployed, tmp_path, trained_as=trained_as)
    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert set(saved) == set(toy.merged) == {f"model.layers.{i}.mlp.down_proj.s" for i in range(2)}
    for name, tensor in toy.merged.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (meta["adapter"], meta["trained_as"]) == (deployed.model_dump(), trained_as.model_dump())
    fresh = tiny_model("llama")
    assert load_adapter(fresh, tmp_path) == deployed
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # merging changes no output
        torch.testing.assert_close(fresh(input_ids=ids).logits, before)


def test_a_trial_trains_with_the_loss_and_saves_the_merge(toy: Toy, tmp_path: Path) -> None:
    """The job runs the registered method end to end; what `finalize` returned is the adapter saved."""
    TINY_CONFIGS["llama"].save_pretrained(tmp_path / "llama")
    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("apple", "river") * 8]
    (tmp_path / "train.json").write_text(json.dumps(records))
    spec = parse_trial_spec({
        "model": str(tmp_path / "llama"), "random_init": True, "tokenizer": "byte",
        "adapter": {"type": "toy", "weight": 0.1},
        "data": {"train": str(tmp_path / "train.json"), "template": "alpaca", "cutoff_len": 48, "val_set_size": 0},
        "train": {"micro_batch_size": 4, "batch_size": 8, "max_steps": 2, "warmup_steps": 1, "lr": 1e-2},
        "seed": 0,
    })
    result = run_trial(spec, MemoryTracker(), tmp_path / "ckpt")
    assert result.status == TrialStatus.SUCCEEDED
    folder = tmp_path / "ckpt" / "result" / "adapter"
    saved = load_file(str(folder / "adapter.safetensors"))
    assert set(saved) == set(toy.merged) and any(t.abs().sum() > 0 for t in saved.values())  # trained, merged
    for name, tensor in toy.merged.items():
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
    meta = json.loads((folder / "adapter_config.json").read_text())
    assert meta["adapter"] == {"type": "toy", "weight": 0.1, "merged": True}
    assert meta["trained_as"] == {"type": "toy", "weight": 0.1, "merged": False}


class MinimalConfig(AdapterConfig):
    type: Literal["minimal"] = "minimal"


class Minimal(AdapterMethod):
    """A method that implements `inject` alone (the toy's unmerged shifts): every other hook is the default."""

    name = "minimal"
    config = MinimalConfig

    def inject(self, model: nn.Module, layout: FamilyLayout, config: AdapterConfig) -> list[nn.Module]:
        return Toy().inject(model, layout, ToyConfig())


def test_the_defaults_of_a_method_that_only_injects() -> None:
    method = Minimal()
    register(method)
    try:
        model, config = tiny_model("llama"), MinimalConfig()
        inject(model, config)
        batch = _batch()
        assert extra_loss(model, batch, config) is None
        assert finalize(model, config) is config
        assert state_dict(model, config).keys() == adapter_state_dict(model).keys() != set()
        assert not model.is_activation_checkpointing
        enable_gradient_checkpointing(model, config)
        assert model.is_activation_checkpointing
    finally:
        unregister(method.name)


def test_registration_refuses_a_clash_and_a_misnamed_config(toy: Toy) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register(Toy())

    class Misnamed(Toy):
        name = "other"

    with pytest.raises(ValueError, match="not the method's name 'other'"):
        register(Misnamed())
    assert "other" not in METHODS
    with pytest.raises(TypeError, match="inject"):
        type("NoInject", (AdapterMethod,), {"name": "x", "config": ToyConfig})()


def test_a_spec_takes_a_method_from_its_registration_on() -> None:
    known = r"expected tags: 'series', 'parallel', 'prefix', 'lora', 'mosa' \[type=union_tag_invalid"
    with pytest.raises(ValueError, match=known):
        TrialSpec.model_validate({"model": "tiny", "adapter": {"type": "toy"}})
    register(Toy())
    try:
        assert TrialSpec.model_validate({"model": "tiny", "adapter": {"type": "toy"}}).adapter == ToyConfig()
    finally:
        unregister("toy")


TINY_LLAMA = Path(__file__).resolve().parents[1] / "sweeps" / "models" / "tiny-llama"  # hidden 64, 2 blocks


@pytest.fixture
def plan_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def test_the_preflight_and_plan_count_a_registered_method_by_its_own_plan(toy: Toy, plan_ws: Path,
                                                                         monkeypatch, capsys) -> None:
    spec = parse_trial_spec({"model": str(TINY_LLAMA), "adapter": {"type": "toy"}})
    assert check_trial(spec, "trial.yaml", training=False, trust_remote_code=False) == 2 * 64 * 2
    merged = spec.model_copy(update={"adapter": ToyConfig(merged=True)})
    assert check_trial(merged, "trial.yaml", training=False, trust_remote_code=False) == 64 * 2
    (plan_ws / "trial.yaml").write_text(yaml.safe_dump({"model": str(TINY_LLAMA), "adapter": {"type": "toy"}}))
    code, out, err = run_cli(["plan", "trial.yaml", "--json"], monkeypatch, capsys)
    assert (code, err) == (0, "")
    assert json.loads(out)["trainable_params"] == 2 * 64 * 2  # the plan is what injecting it trains
    sweep = {"name": "toy", "base": {"model": str(TINY_LLAMA)}, "space": [{"type": "toy", "merged": [False, True]}]}
    (plan_ws / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    code, out, err = run_cli(["plan", "sweep.yaml", "--json"], monkeypatch, capsys)
    assert (code, err) == (0, "")
    assert [p["trainable_params"] for p in json.loads(out)["points"]] == [2 * 64 * 2, 64 * 2]


def test_a_method_without_a_plan_is_refused_in_one_line(plan_ws: Path, monkeypatch, capsys) -> None:
    register(Minimal())
    try:
        spec = parse_trial_spec({"model": str(TINY_LLAMA), "adapter": {"type": "minimal"}})
        with pytest.raises(ConfigError) as caught:
            check_trial(spec, "trial.yaml", training=False, trust_remote_code=False)
        assert (caught.value.file, caught.value.field) == ("trial.yaml", "adapter.type")
        assert "MinimalConfig defines no planned_parameters(layout, shape)" in caught.value.message
        (plan_ws / "trial.yaml").write_text(yaml.safe_dump({"model": str(TINY_LLAMA), "adapter": {"type": "minimal"}}))
        code, out, err = run_cli(["plan", "trial.yaml"], monkeypatch, capsys)
        assert (code, out) == (2, "")
        assert err.strip().splitlines() == [f"error: trial.yaml: adapter.type: {caught.value.message}"]
    finally:
        unregister("minimal")
