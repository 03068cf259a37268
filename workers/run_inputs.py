"""The datasets a trial reads, as the tracker records them (MLflow run inputs): name, context, digest, size.

The training file is one input (context `training`; its validation split and the examples cut by
`cutoff_len` are in its profile), each evaluation set another (context `evaluation`, the questions
asked after `eval.limit`). The digest is the file's SHA-256, so two runs on the same bytes show the
same dataset.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.repo_paths import repo_relative

if TYPE_CHECKING:
    from workers.spec import TrialSpec

DIGEST_CHARS = 12


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset of a trial: where it came from, what it was used for, how big it was."""

    name: str
    context: str  # training | evaluation
    path: str  # repo-relative where the file lies in the checkout
    digest: str
    rows: int
    profile: dict[str, Any] = field(default_factory=dict)


def file_digest(path: Path) -> str:
    """The first `DIGEST_CHARS` hex digits of the file's SHA-256."""
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:DIGEST_CHARS]


def trial_datasets(spec: TrialSpec, stats: dict[str, Any]) -> list[DatasetRecord]:
    """The training set (sizes from `build_train_data`'s `stats`) and each evaluation set of `spec`."""
    from workers.data import load_records
    from workers.tasks import data_root, task_file

    root = data_root(spec.data.data_root)
    train = Path(stats["train_file"])
    records = [DatasetRecord(
        train.stem, "training", repo_relative(str(train)), file_digest(train), int(stats["train_examples"]),
        {"validation_rows": stats["val_examples"], "dropped_after_cutoff": stats["dropped_after_cutoff"],
         "train_tokens": stats["train_tokens"]},
    )]
    for name in spec.data.eval:
        path = task_file(name, root)
        total = len(load_records(path))
        asked = total if spec.eval.limit is None else min(spec.eval.limit, total)
        records.append(DatasetRecord(Path(name).stem, "evaluation", repo_relative(str(path)), file_digest(path),
                                     asked, {"file_rows": total}))
    return records
