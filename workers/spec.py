"""Trial specs: plain typed data shared by the worker and the driver. No I/O but `load_trial_spec`.

A trial spec is what one fine-tune-and-evaluate job needs. Every section has the paper's defaults
(LLM-Adapters, Hu et al. 2023), so a spec names only what differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.adapters.config import AdapterSpec
from workers.errors import ConfigError

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def safe_name(value: str) -> str:
    """`value` when it is one plain path component (names become folders: no `/`, no `..`), else ValueError."""
    if not _SAFE_NAME.fullmatch(value):
        raise ValueError("a name becomes a folder: use 1-100 letters, digits, `_`, `.` or `-`, "
                         "starting with a letter or digit")
    return value


SafeName = Annotated[str, AfterValidator(safe_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Test sets a named training set is built from, by its makers' word (LLM-Adapters README, "Special
# Announcement"): math_10k holds MAWPS training data, and MAWPS holds AddSub, MultiArith and SingleEq;
# math_7k and math_14k are math_10k without the MAWPS part. math_data (the repository's first math set)
# repeats 80% of every math test set (SOURCE.md of the shared data).
CONTAINS: dict[str, frozenset[str]] = {
    "math_10k": frozenset({"addsub", "multiarith", "singleeq"}),
    "math_data": frozenset({"gsm8k", "svamp", "aqua", "addsub", "multiarith", "singleeq", "mawps"}),
}


class DataSpec(_Section):
    """Training and evaluation data, in the paper's instruction/input/output/answer JSON format."""

    train: str | None = Field(None, description="a task name (math_10k, commonsense_170k, boolq, ...) or a JSON file")
    eval: list[str] = Field(default_factory=list, description="evaluation task names")
    data_root: str | None = Field(None, description="folder of the data sets; else $ADAPTUNE_DATA")
    cutoff_len: int = Field(256, gt=0)
    train_on_inputs: bool = True
    template: Literal["paper", "alpaca"] = Field(
        "paper", description="paper: the reference's texts, finetune.py's for training, evaluate.py's for tests")
    val_set_size: int = Field(120, ge=0)
    limit_train: int | None = Field(None, gt=0, description="use only the first N training examples")
    group_by_length: bool = False
    packing: bool = False
    allow_leakage: bool = False

    @model_validator(mode="after")
    def _no_known_leak(self) -> DataSpec:
        """A test set the training set is known to contain is refused before any file is read."""
        leaked = sorted(CONTAINS.get(self.train or "", frozenset()) & set(self.eval))
        if leaked and not self.allow_leakage:
            raise ValueError(
                f"{self.train} contains the {', '.join(leaked)} test questions (its makers' announcement); "
                "evaluate other sets, train on math_7k or math_14k, or set data.allow_leakage: true"
            )
        return self


class TrainSpec(_Section):
    """Optimisation, with the paper's defaults: micro batch 4, batch 16, 3 epochs, lr 3e-4."""

    epochs: float = Field(3.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    lr: float = Field(3e-4, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    batch_size: int = Field(16, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
    compile: bool | None = Field(
        None, description="compile each decoder layer (workers/compile.py); unset: on CUDA, not on a CPU")
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(200, gt=0, description="validation loss every M optimizer steps")
    save_every: int = Field(200, gt=0, description="checkpoint every K optimizer steps")
    keep_checkpoints: int = Field(2, gt=0)
    load_best: bool = Field(False, description="end on the adapter of the lowest validation loss (ZeRO 0-2)")

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSpec:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )
        if self.load_best and self.zero_stage == 3:
            raise ValueError("load_best needs whole adapter parameters on every rank: zero_stage 0, 1 or 2")
        return self


class EvalSpec(_Section):
    """How evaluation generates and scores."""

    protocol: Literal["batched", "paper"] = Field("batched", description="paper = batch 1, beam search 4")
    scoring: Literal["paper", "strict"] = "paper"
    max_new_tokens: int | None = Field(
        None, gt=0, description="None: the reference's, 256 for math sets (evaluate.py), 32 for the others "
                                "(commonsense_evaluate.py)")
    batch_size: int = Field(32, gt=0)
    limit: int | None = Field(None, gt=0, description="evaluate only the first N questions of each set")
    cache: Literal["dynamic", "static"] | None = Field(
        None, description="batched decoding's KV cache: static keeps every step's shapes (length-bucketed), "
                          "dynamic drops finished rows; unset: static on CUDA, dynamic on a CPU; prefix tuning "
                          "always decodes with the dynamic one")
    compile: bool | None = Field(
        None, description="compile the one-token decoding step of a static cache once, for every batch; "
                          "unset: on CUDA, not on a CPU")


class TrialSpec(_Section):
    """One fine-tune-and-evaluate job."""

    name: SafeName | None = None
    model: str = Field(description="a hub id, or a folder with config.json")
    random_init: bool = Field(False, description="build the model from its config with random weights")
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="config fields to override")
    tokenizer: str | None = Field(None, description="hub id or folder; `byte` for the built-in byte tokenizer")
    trust_remote_code: bool = False
    load_in_8bit: bool = Field(
        False, description="the frozen base in 8-bit (bitsandbytes LLM.int8(), the reference's --load_8bit); "
                           "needs a CUDA GPU and bitsandbytes where the trial runs")
    adapter: AdapterSpec
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seed: int = 42

    @model_validator(mode="after")
    def _best_needs_validation(self) -> TrialSpec:
        if self.train.load_best and self.data.val_set_size == 0:
            raise ValueError("train.load_best chooses by validation loss: give data.val_set_size > 0")
        return self

    @model_validator(mode="after")
    def _eight_bit_base(self) -> TrialSpec:
        """Refused here whatever the machine; CUDA and bitsandbytes are checked where the model loads."""
        if self.load_in_8bit and self.random_init:
            raise ValueError("load_in_8bit quantizes pretrained weights; random_init has none")
        if self.load_in_8bit and self.train.zero_stage == 3:
            raise ValueError("load_in_8bit: ZeRO-3 cannot partition 8-bit weights; use zero_stage 0, 1 or 2")
        return self


# pydantic names the member of a union a value failed in the location (`seed.int`, `seed.list[int]`).
_UNION_MEMBER = re.compile(r"(int|float|str|bool|none|(list|dict|literal|function-\w+)\[.*\])", re.IGNORECASE)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc]
    return ".".join(part for i, part in enumerate(parts) if not (i and _UNION_MEMBER.fullmatch(part)))


def config_error_from(exc: ValidationError, file: str | None, prefix: str = "") -> ConfigError:
    """The first validation error of `exc` as a one-line `ConfigError`."""
    err = exc.errors()[0]
    field = _field_path(err["loc"])
    if prefix:
        field = f"{prefix}.{field}" if field else prefix
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "union_tag_invalid":
        msg = f"unknown adapter type; expected one of: {err['ctx']['expected_tags']}"
    elif err["type"] == "extra_forbidden":
        msg = "unknown field for this section (a field this method or section does not take)"
    elif not isinstance(err.get("input"), dict | list):
        msg = f"{msg} (got {err.get('input')!r})"
    return ConfigError(file, field or None, msg)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from `path`, or a `ConfigError` naming the file."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(str(p), None, "file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(p), None, f"cannot read YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(p), None, "expected a YAML mapping at the top level")
    return data


def parse_trial_spec(data: dict[str, Any], file: str | None = None) -> TrialSpec:
    try:
        return TrialSpec.model_validate(data)
    except ValidationError as exc:
        raise config_error_from(exc, file) from None


def load_trial_spec(path: str | Path) -> TrialSpec:
    """Read and validate a trial spec file; relative model/data paths resolve against the cwd."""
    return parse_trial_spec(read_yaml(path), str(path))


# Fields that may change between an interrupted run and its resume: they do not touch training.
RESUMABLE_CHANGES = {"name", "eval"}


def trial_id(spec: TrialSpec) -> str:
    """A stable identity: a hash of everything that shapes training, after the spec's name if it has one."""
    body = json.dumps(spec.model_dump(mode="json", exclude=RESUMABLE_CHANGES), sort_keys=True)
    digest = hashlib.sha256(body.encode()).hexdigest()
    # Two different specs under one name must not share a run or a checkpoint folder.
    return f"{spec.name}-{digest[:8]}" if spec.name else digest[:16]
