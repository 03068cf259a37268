"""Where data sets live: the paper's task names, its training sets, and how names resolve to files.

Plain tables and path rules, no torch and no `datasets`: the driver's pre-flight reads them too.
Task names resolve against a data root: the spec's `data_root`, else `$ADAPTUNE_DATA`, else `./data`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from workers.errors import ConfigError

AnswerKind = Literal["number", "letter", "choice"]


@dataclass(frozen=True)
class Task:
    """An evaluation set: where its file lives and how its answers are scored."""

    name: str
    folder: str
    kind: AnswerKind
    choices: tuple[str, ...] = ()  # the answer words of a commonsense set, in the paper's regex order


MATH_TASKS = ("gsm8k", "svamp", "aqua", "addsub", "multiarith", "singleeq", "mawps")
COMMONSENSE_TASKS = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc_e", "arc_c", "obqa")

_ANSWERS = tuple(f"answer{i}" for i in range(1, 6))
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("gsm8k", "gsm8k", "number"),
        Task("svamp", "SVAMP", "number"),
        Task("aqua", "AQuA", "letter"),
        Task("addsub", "AddSub", "number"),
        Task("multiarith", "MultiArith", "number"),
        Task("singleeq", "SingleEq", "number"),
        Task("mawps", "mawps", "number"),
        Task("boolq", "boolq", "choice", ("true", "false")),
        Task("piqa", "piqa", "choice", ("solution1", "solution2")),
        Task("siqa", "social_i_qa", "choice", _ANSWERS),
        Task("hellaswag", "hellaswag", "choice", tuple(f"ending{i}" for i in range(1, 5))),
        Task("winogrande", "winogrande", "choice", ("option1", "option2")),
        Task("arc_e", "ARC-Easy", "choice", _ANSWERS),
        Task("arc_c", "ARC-Challenge", "choice", _ANSWERS),
        Task("obqa", "openbookqa", "choice", _ANSWERS),
    )
}

# The paper's fine-tuning sets; users bring math_10k and commonsense_170k themselves.
TRAIN_SETS: dict[str, str] = {
    "math_10k": "ft-training_set/math_10k.json",
    "math_7k": "ft-training_set/math_7k.json",
    "math_14k": "ft-training_set/math_14k.json",
    "math_data": "ft-training_set/math_data.json",
    "commonsense_170k": "ft-training_set/commonsense_170k.json",
    "commonsense_15k": "ft-training_set/commonsense_15k.json",
}


def data_root(spec_root: str | None = None) -> Path:
    """The folder task names resolve against: the spec's, else $ADAPTUNE_DATA, else ./data."""
    return Path(spec_root or os.environ.get("ADAPTUNE_DATA") or "data").expanduser()


def is_custom(name: str) -> bool:
    """An evaluation set given as a JSON file of its own rather than a task name."""
    return name.endswith(".json")


def task(name: str) -> Task:
    """The task `name`; a `.json` path is a custom set scored as true/false, a letter or a number."""
    if is_custom(name):
        return Task(Path(name).stem, name, "choice", ("true", "false"))
    try:
        return TASKS[name]
    except KeyError:
        known = " ".join(TASKS)
        msg = f"unknown task {name!r}; expected one of: {known} or a .json file"
        raise ConfigError(None, "data.eval", msg) from None


def task_of_answers(path: Path, gold: Sequence[object]) -> Task:
    """A custom set's scoring, read off its gold answers: true/false, A-E, else numbers."""
    answers = {str(a).strip() for a in gold}
    if answers <= {"true", "false"}:
        return Task(path.stem, str(path), "choice", ("true", "false"))
    if answers <= set("ABCDE"):
        return Task(path.stem, str(path), "letter")
    try:
        [float(a) for a in answers]
    except ValueError:
        raise ConfigError(str(path), "answer", "custom sets need true/false, A-E or numeric answers") from None
    return Task(path.stem, str(path), "number")


def task_file(name: str, root: Path, split: str = "test") -> Path:
    """The JSON file of task `name` under `root`; a `ConfigError` names it and where it looked."""
    path = Path(name).expanduser() if is_custom(name) else root / "dataset" / task(name).folder / f"{split}.json"
    if not path.is_file():
        raise ConfigError(str(path), None, f"no {split} file for task {name!r} (data root: {root.resolve()})")
    return path


def train_file(name: str, root: Path) -> Path:
    """A training set: a name of `TRAIN_SETS`, a task with a train split, or a JSON file path."""
    if name in TRAIN_SETS:
        path = root / TRAIN_SETS[name]
    elif name in TASKS:
        path = root / "dataset" / TASKS[name].folder / "train.json"
    else:
        path = Path(name).expanduser()
        if path.suffix != ".json":
            known = " ".join([*TRAIN_SETS, *TASKS])
            msg = f"unknown training set {name!r}; expected a .json file or one of: {known}"
            raise ConfigError(None, "data.train", msg)
    if not path.is_file():
        raise ConfigError(str(path), "data.train", f"training file not found (data root: {root.resolve()})")
    return path


def normalise(text: str) -> str:
    """Instruction text for comparison: lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
