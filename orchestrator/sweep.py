"""Sweep files: one YAML file describes a study; it is validated and expanded before Ray starts.

```yaml
name: placement-llama7b
base: {model: huggyllama/llama-7b, data: {train: math_10k, eval: [gsm8k, svamp]}}   # TrialSpec fields
train: {epochs: 3, lr: 3e-4}                   # defaults for every trial; a list is an axis
seed: [1, 2, 3]                                # an axis too: repeated runs
space:                                         # branches: a conditional space, one per method
  - {type: lora, placement: [[q, k, v], [up, down]], rank: [8, 32]}
  - {type: prefix, virtual_tokens: [10, 30]}
```

In a branch, a list is a grid axis (a placement axis is a list of lists), a mapping with one key among
`loguniform uniform randint choice` is a distribution, anything else a fixed value; `train:`, `data:`
(settings such as `val_set_size`; paths belong in `base`) and `seed` may appear in a branch too.
Every expanded point must make a valid `TrialSpec`: a field a method does not take is an error
naming the branch and the field.
"""

from __future__ import annotations

import ast
import itertools
import math
import random
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from workers.errors import ConfigError
from workers.names import MACRO_ACCURACY
from workers.redaction import redact
from workers.spec import SafeName, TrialSpec, config_error_from, read_yaml

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SearchSpec(_Section):
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0, description="points drawn per branch (random) or in all (optuna)")
    metric: str = MACRO_ACCURACY
    mode: Literal["max", "min"] = "max"
    seed: int = 0


class SchedulerSpec(_Section):
    type: Literal["fifo", "asha"] = "fifo"
    metric: Literal["val_loss", "train_loss"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, gt=0, description="reports a trial makes before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1)


class ResourcesSpec(_Section):
    gpus_per_trial: float = Field(0, ge=0, description="GPUs per worker: 1, or a share of one")
    workers_per_trial: int = Field(1, gt=0)
    cpus_per_worker: float = Field(1, gt=0)

    @field_validator("gpus_per_trial")
    @classmethod
    def _one_gpu_per_rank(cls, gpus: float) -> float:
        # Each worker (rank) trains on one GPU: more would be held and left idle.
        if gpus > 1:
            raise ValueError(f"a worker trains on one GPU; for {gpus:g} per trial set workers_per_trial: {gpus:g}")
        return gpus

    @field_validator("workers_per_trial")
    @classmethod
    def _whole_gpus_for_several_workers(cls, workers: int, info: ValidationInfo) -> int:
        gpus = info.data.get("gpus_per_trial", 0)
        if workers > 1 and 0 < gpus < 1:
            raise ValueError(f"the {workers} workers of a trial need a GPU each (NCCL runs one rank per GPU); "
                             f"gpus_per_trial is {gpus:g}")
        return workers


class TrackingSpec(_Section):
    uri: str = "sqlite:///mlflow.db"
    experiment: str | None = None
    # How long a trial trains on, spooling its record to disk, while the store does not answer.
    max_outage_s: float = Field(1800.0, gt=0)


class SweepSpec(_Section):
    name: SafeName
    base: dict[str, Any]
    train: dict[str, Any] = Field(default_factory=dict)
    seed: int | list[int] = 42
    space: list[dict[str, Any]] = Field(min_length=1)
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: str = "./runs"

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name


class Point(BaseModel):
    """One trial of a sweep: its branch, the values chosen on each axis, and the full trial spec."""

    model_config = ConfigDict(frozen=True)

    branch: int
    values: dict[str, Any]
    spec: TrialSpec

    @property
    def name(self) -> str:
        """The run name: the adapter's short name, plus whatever else varies (`lora-r32-qkvud-lr0.001-s2`)."""
        extra = [f"{k.rsplit('.', 1)[-1]}{v}" for k, v in self.values.items() if k.startswith("train.")]
        if "seed" in self.values:
            extra.append(f"s{self.values['seed']}")
        return "-".join([self.spec.adapter.short_name(), *extra])


def _is_distribution(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in DISTRIBUTIONS


def _axes(branch: dict[str, Any], train: dict[str, Any], seed: Any) -> dict[str, Any]:
    """Every field of one branch, keyed `adapter.*`, `train.*`, `data.*` or `seed`, values as written."""
    fields: dict[str, Any] = {f"train.{k}": v for k, v in train.items()}
    fields["seed"] = seed
    for key, value in branch.items():
        if key in ("train", "data"):
            if not isinstance(value, dict):
                raise ValueError(f"{key} in a branch must be a mapping")
            fields.update({f"{key}.{k}": v for k, v in value.items()})
        elif key == "seed":
            fields["seed"] = value
        else:
            fields[f"adapter.{key}"] = value
    return fields


def _is_axis(key: str, value: Any) -> bool:
    if _is_distribution(value):
        return True
    if not isinstance(value, list):
        return False
    # placement is itself a list: it is an axis only as a list of lists.
    return key != "adapter.placement" or all(isinstance(v, list) for v in value)


def _sample(value: dict[str, Any], rng: random.Random) -> Any:
    kind, args = next(iter(value.items()))
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "uniform":
        return rng.uniform(low, high)
    return rng.randrange(low, high)


def _trial_dict(sweep: SweepSpec, fields: dict[str, Any]) -> dict[str, Any]:
    spec = dict(sweep.base)
    spec["adapter"] = {}
    spec["train"] = dict(spec.get("train", {}))
    spec["data"] = dict(spec.get("data", {}))
    for key, value in fields.items():
        if key == "seed":
            spec["seed"] = value
        else:
            section, name = key.split(".", 1)
            spec[section][name] = value
    return spec


def _where(key: str, branch: int) -> str:
    return f"space[{branch}].{key.removeprefix('adapter.')}" if key.startswith("adapter.") else key


def field_in_file(sweep: SweepSpec, branch: int, field: str) -> str:
    """Where a trial spec's `field` (`adapter.rank`, `data.train`) of branch `branch` is written in the file."""
    if field == "adapter" or field.startswith("adapter."):
        return f"space[{branch}]{field.removeprefix('adapter')}"
    written = sweep.space[branch]
    if field == "seed":
        return f"space[{branch}].seed" if "seed" in written else "seed"
    if field == "train":
        return field
    if field.startswith("train."):
        name = field.removeprefix("train.").split(".")[0]
        if name in (written.get("train") or {}):
            return f"space[{branch}].{field}"
        if name in sweep.train:
            return field
    return f"base.{field}" if field else "base"


def _point(sweep: SweepSpec, file: str, branch: int, fields: dict[str, Any], varying: list[str]) -> Point:
    try:
        spec = TrialSpec.model_validate(_trial_dict(sweep, fields))
    except ValidationError as exc:
        err = config_error_from(exc, file)
        raise ConfigError(file, field_in_file(sweep, branch, err.field or ""), err.message) from None
    return Point(branch=branch, values={k: fields[k] for k in varying}, spec=spec)


def _check_distribution(value: dict[str, Any]) -> str | None:
    """Why `value` cannot be sampled, or None."""
    kind, args = next(iter(value.items()))
    if not isinstance(args, list) or not args:
        return f"{kind} needs a non-empty list"
    if kind == "choice":
        return None
    if len(args) != 2 or not all(isinstance(a, int | float) for a in args):
        return f"{kind} needs [low, high], got {args!r}"
    low, high = args
    if kind == "loguniform" and low <= 0:
        return f"loguniform needs low > 0, got {low}"
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        return f"randint needs integers, got {args!r}"
    if low >= high:
        return f"{kind} needs low < high (randint excludes high), got {args!r}"
    return None


def _branch_axes(sweep: SweepSpec, file: str, b: int) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        fields = _axes(sweep.space[b], sweep.train, sweep.seed)
    except ValueError as exc:
        raise ConfigError(file, f"space[{b}]", str(exc)) from None
    axes = {k: v for k, v in fields.items() if _is_axis(k, v)}
    for key, value in axes.items():
        if isinstance(value, list) and not value:
            raise ConfigError(file, _where(key, b), "empty axis: give at least one value")
        if _is_distribution(value) and (why := _check_distribution(value)):
            raise ConfigError(file, _where(key, b), why)
    return fields, axes


def expand(sweep: SweepSpec, file: str = "<sweep>") -> list[Point]:
    """Every trial of a grid or random sweep, each validated as a `TrialSpec`."""
    points: list[Point] = []
    rng = random.Random(sweep.search.seed)
    for b in range(len(sweep.space)):
        fields, axes = _branch_axes(sweep, file, b)
        varying = [k for k, v in axes.items() if _is_distribution(v) or len(v) > 1]
        if sweep.search.algorithm == "grid":
            for key, value in axes.items():
                if _is_distribution(value):
                    raise ConfigError(file, _where(key, b), "a distribution needs search.algorithm random or optuna")
            keys = list(axes)
            for combo in itertools.product(*(axes[k] for k in keys)):
                points.append(_point(sweep, file, b, {**fields, **dict(zip(keys, combo, strict=True))}, varying))
        else:
            for _ in range(sweep.search.num_samples):
                chosen = {k: _sample(v, rng) if _is_distribution(v) else rng.choice(v) for k, v in axes.items()}
                points.append(_point(sweep, file, b, {**fields, **chosen}, varying))
    return points


def _first(value: Any) -> Any:
    if _is_distribution(value):
        return next(iter(value.values()))[0]
    return value[0]


def _absolute(value: Any) -> Any:
    """A relative path that exists here, made absolute; anything else (a hub id) as it is."""
    if isinstance(value, str) and not Path(value).is_absolute() and Path(value).exists():
        return str(Path(value).resolve())
    return value


def absolutize(raw: dict[str, Any]) -> dict[str, Any]:
    """Relative paths of a sweep resolved against the working directory, once, here: trials run in
    other processes and folders (Ray workers), where `sweeps/models/...` would mean nothing."""
    raw = dict(raw)
    if not isinstance(raw.get("base") or {}, dict) or not isinstance(raw.get("tracking") or {}, dict):
        return raw  # not mappings: validation names the field
    base = dict(raw.get("base") or {})
    for key in ("model", "tokenizer"):
        if key in base:
            base[key] = _absolute(base[key])
    data = dict(base.get("data") or {}) if isinstance(base.get("data") or {}, dict) else {}
    for key in ("train", "data_root"):
        if key in data:
            data[key] = _absolute(data[key])
    if isinstance(data.get("eval"), list):
        data["eval"] = [_absolute(e) for e in data["eval"]]
    if data:
        base["data"] = data
    raw["base"] = base
    tracking = dict(raw.get("tracking") or {})
    uri = tracking.get("uri", "sqlite:///mlflow.db")
    if isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        tracking["uri"] = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    raw["tracking"] = tracking
    return raw


def representatives(sweep: SweepSpec, file: str = "<sweep>") -> list[Point]:
    """One validated point per branch, at the first value of every axis: what an Optuna sweep can be checked by."""
    points = []
    for b in range(len(sweep.space)):
        fields, axes = _branch_axes(sweep, file, b)
        points.append(_point(sweep, file, b, {**fields, **{k: _first(v) for k, v in axes.items()}}, []))
    return points


def redacted_text(path: str | Path) -> str:
    """The text of a sweep file less its secrets (`workers.redaction.redact`): what adaptune may copy or log."""
    text = Path(path).read_text()
    raw = yaml.safe_load(text)
    clean = redact(raw)
    return text if clean == raw else yaml.safe_dump(clean, sort_keys=False)


def load_sweep(path: str | Path) -> tuple[SweepSpec, list[Point]]:
    """Read, validate and expand a sweep file; every error names the file and the field."""
    file = str(path)
    raw = read_yaml(path)
    try:
        sweep = SweepSpec.model_validate(absolutize(raw))
    except ValidationError as exc:
        raise config_error_from(exc, file) from None
    if sweep.search.algorithm == "optuna":
        representatives(sweep, file)  # Optuna draws points while the sweep runs
        return sweep, []
    points = expand(sweep, file)
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(file, "space", f"two trials would be the same point: {', '.join(dupes[:3])}")
    return sweep, points


def experiment_dir(sweep: SweepSpec) -> Path:
    """The folder of a sweep's state: `<storage>/<name>`."""
    return Path(sweep.storage).expanduser().resolve() / sweep.name


def optuna_space(sweep: SweepSpec) -> Any:
    """A define-by-run search space for Optuna: the branch first, then that branch's axes."""

    def define(trial: Any) -> None:
        b = trial.suggest_categorical("branch", list(range(len(sweep.space))))
        for key, value in _axes(sweep.space[b], sweep.train, sweep.seed).items():
            if not _is_axis(key, value):
                continue
            name = f"{b}.{key}"
            if not _is_distribution(value):
                trial.suggest_categorical(name, [repr(v) for v in value])
                continue
            kind, args = next(iter(value.items()))
            if kind == "choice":
                trial.suggest_categorical(name, args)
            elif kind == "randint":
                trial.suggest_int(name, args[0], args[1] - 1)
            else:
                trial.suggest_float(name, args[0], args[1], log=kind == "loguniform")

    return define


def point_from_optuna(sweep: SweepSpec, config: dict[str, Any], file: str = "<sweep>") -> Point:
    """The trial an Optuna suggestion (from `optuna_space`) stands for."""
    b = int(config["branch"])
    fields = _axes(sweep.space[b], sweep.train, sweep.seed)
    varying = []
    for key, value in fields.items():
        if _is_axis(key, value):
            raw = config[f"{b}.{key}"]
            fields[key] = raw if _is_distribution(value) else ast.literal_eval(raw)
            varying.append(key)
    return _point(sweep, file, b, fields, varying)
