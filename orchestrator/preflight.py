"""The pre-flight: everything a trial needs, checked before Ray starts, with no weights and no torch.

`check_trial` takes one trial spec; `check_sweep` every trial of a sweep, naming each problem by
its path in the user's file (`space[0].placement`, `base.data.train`). The model's config is read
with `json` (from its folder or the hub cache), the data files with `json`; the placement tables
and adapter configs are plain data. Nothing is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.model_shape import Shape, has_tokenizer, hub_file, looks_like_path, read_config
from orchestrator.sweep import Point, SweepSpec, field_in_file, representatives
from workers.errors import ConfigError
from workers.placement import FAMILIES, FamilyLayout
from workers.spec import TrialSpec
from workers.tasks import data_root, is_custom, normalise, task, task_file, task_of_answers, train_file

Where = Callable[[str], str]
TRAIN_FIELDS = ("instruction", "output")
EVAL_FIELDS = ("instruction", "answer")
# Bytes per trainable parameter: fp32 weight, gradient and two Adam moments.
TRAINABLE_BYTES = 16


def memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _layout(model_type: Any) -> FamilyLayout:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
    raise ConfigError(None, "model", f"model type {model_type!r} is not supported; supported: {known}")


def _records(path: Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """The records of a paper-format JSON file (a list, or JSON lines), each with non-empty `required`."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a JSON list of records")
    if not data:
        raise ValueError(f"{path} holds no records")
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is not a JSON object")
        for key in required:
            value = record.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"{path}: record {index} has no {key!r} (every record needs {', '.join(required)})")
    return data


class Preflight:
    """Checks trials, reading each model config and data file once however many trials share it."""

    def __init__(self, *, training: bool, trust_remote_code: bool, gpus: float = 0,
                 memory: int | None = None) -> None:
        """`training`: the trials will train (a training set is required, memory is checked on CPU);
        `trust_remote_code`: the command line allows the model's own code; `gpus`: per worker."""
        self.training = training
        self.trust_remote_code = trust_remote_code
        self.gpus = gpus
        self.memory = memory
        self._configs: dict[str, dict[str, Any]] = {}
        self._records: dict[tuple[Path, tuple[str, ...]], list[dict[str, Any]]] = {}

    def _config(self, spec: TrialSpec) -> dict[str, Any]:
        key = json.dumps([spec.model, spec.model_overrides], sort_keys=True, default=str)
        if key not in self._configs:
            self._configs[key] = read_config(spec.model, spec.model_overrides)
        return self._configs[key]

    def _read(self, path: Path, required: Sequence[str], field: str) -> list[dict[str, Any]]:
        key = (path, tuple(required))
        if key not in self._records:
            try:
                self._records[key] = _records(path, required)
            except ValueError as exc:
                raise ConfigError(None, field, str(exc)) from None
        return self._records[key]

    def check(self, spec: TrialSpec) -> int:
        """Every check of one trial; a `ConfigError` names the failing field of the spec. Returns about how
        many parameters the trial's adapter trains (its config's `planned_parameters`)."""
        if spec.trust_remote_code and not self.trust_remote_code:
            raise ConfigError(None, "trust_remote_code", "would run the Python files of the model folder: "
                                                         "pass --trust-remote-code on the command line as well "
                                                         "(never honoured by plan or --dry-run)")
        config = self._config(spec)
        layout = _layout(config.get("model_type"))
        shape = Shape(config, layout)
        # The method's own config checks its sizes against the model and counts what it trains.
        trainable = spec.adapter.planned_parameters(layout, shape)
        self._check_memory(spec, shape, trainable)
        if self.training:
            self._check_tokenizer(spec)
        layout.check_packing(spec.data.packing)
        if self.training and not self.gpus and spec.train.precision in ("bf16", "fp16"):
            raise ConfigError(None, "train.precision", f"{spec.train.precision} needs a GPU and the trials run on "
                                                       "CPUs (resources.gpus_per_trial is 0): use fp32 or auto")
        if self.training and spec.load_in_8bit and not self.gpus:
            raise ConfigError(None, "load_in_8bit", "8-bit loading (bitsandbytes) needs a CUDA GPU; the trials run "
                                                    "on CPUs")
        self._check_data(spec)
        return trainable

    def _check_memory(self, spec: TrialSpec, shape: Shape, trainable: int) -> None:
        if not self.training or self.gpus or self.memory is None:
            return
        base = shape.base_parameters()
        base_bytes = 2 if spec.train.precision in ("bf16", "fp16") else 4
        need = base * base_bytes + trainable * TRAINABLE_BYTES
        if need > self.memory:
            raise ConfigError(None, "model", f"needs about {need / 2**30:.1f} GiB for weights and optimizer state "
                                             f"(~{base:,} base parameters at {base_bytes} bytes, ~{trainable:,} "
                                             f"trainable at {TRAINABLE_BYTES}); this machine has "
                                             f"{self.memory / 2**30:.1f} GiB")

    def _check_tokenizer(self, spec: TrialSpec) -> None:
        name = spec.tokenizer or spec.model
        field = "tokenizer"
        if name == "byte":
            return
        if looks_like_path(name):
            folder = Path(name).expanduser()
            if not folder.is_dir() or not has_tokenizer(folder):
                raise ConfigError(None, field, f"{folder} has no tokenizer (tokenizer.json, tokenizer_config.json, "
                                               f"tokenizer.model or vocab.json): set tokenizer to a folder with "
                                               f"one, a hub id, or byte")
            return
        if hub_file(name, "tokenizer_config.json", field) is None and hub_file(name, "tokenizer.json", field) is None:
            raise ConfigError(None, field, f"the hub repo {name!r} has no tokenizer")

    def _check_data(self, spec: TrialSpec) -> None:
        data = spec.data
        root = data_root(data.data_root)
        train: list[dict[str, Any]] | None = None
        if data.train is None:
            if self.training:
                raise ConfigError(None, "data.train", "no training set given")
        else:
            try:
                path = train_file(data.train, root)
            except ConfigError as exc:
                where = f"{exc.file}: " if exc.file else ""
                raise ConfigError(None, "data.train", f"{where}{exc.message}") from None
            train = self._read(path, TRAIN_FIELDS, "data.train")
            kept = min(len(train), data.limit_train or len(train))
            if data.val_set_size and data.val_set_size >= kept:
                raise ConfigError(None, "data.val_set_size", f"{data.val_set_size} validation examples asked of "
                                                             f"{kept} training records in {path}")
            left = kept - data.val_set_size
            if self.training and left < spec.train.batch_size:
                raise ConfigError(None, "train.batch_size", f"{left} training examples do not fill one batch of "
                                                            f"{spec.train.batch_size} ({path})")
        seen = {normalise(str(r["instruction"])) for r in train} if train and not data.allow_leakage else set()
        for i, name in enumerate(data.eval):
            field = f"data.eval[{i}]"
            try:
                task(name)
                path = task_file(name, root)
            except ConfigError as exc:
                where = f"{exc.file}: " if exc.file else ""
                raise ConfigError(None, field, f"{where}{exc.message}") from None
            records = self._read(path, EVAL_FIELDS, field)
            if is_custom(name):
                try:
                    task_of_answers(path, [r["answer"] for r in records])
                except ConfigError as exc:
                    raise ConfigError(None, field, f"{path}: {exc.message}") from None
            overlap = [r["instruction"] for r in records if normalise(str(r["instruction"])) in seen]
            if overlap:
                raise ConfigError(None, "data.allow_leakage",
                                  f"{len(overlap)} training instructions also appear in the {name} test set "
                                  f"({path}), e.g. {str(overlap[0])[:60]!r}; remove them or set "
                                  f"data.allow_leakage: true")


def check_trial(spec: TrialSpec, file: str, *, training: bool, trust_remote_code: bool, gpus: float = 0,
                memory: int | None = None) -> int:
    """Pre-flight of one trial spec file: a `ConfigError` naming `file` and the field; else about how many
    parameters the trial's adapter trains."""
    try:
        return Preflight(training=training, trust_remote_code=trust_remote_code, gpus=gpus,
                         memory=memory).check(spec)
    except ConfigError as exc:
        raise ConfigError(file, exc.field, exc.message) from None


def check_sweep(sweep: SweepSpec, points: Sequence[Point], file: str, *, training: bool, trust_remote_code: bool,
                memory: int | None = None) -> None:
    """Pre-flight of every trial of a sweep (one per branch for Optuna), each problem named by its path in `file`."""
    flight = Preflight(training=training, trust_remote_code=trust_remote_code, gpus=sweep.resources.gpus_per_trial,
                       memory=memory)
    for point in points or representatives(sweep, file):
        try:
            flight.check(point.spec)
        except ConfigError as exc:
            raise ConfigError(file, field_in_file(sweep, point.branch, exc.field or ""), exc.message) from None

