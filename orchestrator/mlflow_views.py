"""What a person sees first in MLflow's UI: a saved runs-table view per experiment, and links to it.

MLflow's UI restores a runs-table view (visible columns, sort order) from an experiment tag
`mlflow.sharedViewState.<key>` when the page's URL carries `?viewStateShareKey=<key>`; the tag
`mlflow.experimentKind` makes the experiment open on its runs rather than the GenAI overview. A
sweep saves both on its experiment (`save_runs_view`), and `adaptune ui` prints, per sweep, the link
to its runs with that view and the link to the compare view of its trials (`sweep_links`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote

from mlflow import MlflowClient

from workers.names import (
    CPU_HOURS,
    EXPERIMENT_KIND_TAG,
    GPU_HOURS,
    MODEL_TRAINING,
    PARENT_TAG,
    SWEEP_TAG,
    TRAINABLE_PARAMS,
)

VIEW_KEY = "adaptune"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
# The runs table's columns, in order: what the trial is, how well it did, what it cost.
PARAM_COLUMNS = ("adapter.type", "adapter.placement")
METRIC_COLUMNS = (TRAINABLE_PARAMS, GPU_HOURS, CPU_HOURS)


def _column(kind: str, key: str) -> str:
    # The UI's canonical column key (`makeCanonicalSortKey`): attributes.`Dataset`, metrics.`accuracy/macro`.
    return f"{kind}.`{key}`"


def runs_view(metric: str) -> dict[str, object]:
    """The saved view: the sweep's metric first, then the adapter, the dataset, size and cost; the
    trials grouped by adapter type, groups open (the UI opens no parent's nested runs by itself),
    each group's row showing its best value; the sweep's parent run under "Additional runs"."""
    return {
        "groupBy": {"aggregateFunction": "max", "groupByKeys": [{"mode": "param", "groupByData": "adapter.type"}]},
        "selectedColumns": [
            _column("metrics", metric), *(_column("params", p) for p in PARAM_COLUMNS),
            _column("attributes", "Dataset"), *(_column("metrics", m) for m in METRIC_COLUMNS),
        ],
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }


def save_runs_view(client: MlflowClient, experiment_id: str, metric: str) -> None:
    """Tag the experiment as model training and save the runs view for `metric` on it."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(runs_view(metric)))


def runs_url(base: str, experiment_id: str, *, with_view: bool = True) -> str:
    """The experiment's runs table, with the saved view where the experiment has one."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{url}?viewStateShareKey={VIEW_KEY}" if with_view else url


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow's compare view of `run_ids` (parameters side by side, parallel coordinates, scatter plots)."""
    runs = quote(json.dumps(run_ids, separators=(",", ":")))
    experiments = quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base.rstrip('/')}/#/compare-runs?runs={runs}&experiments={experiments}"


@dataclass(frozen=True)
class SweepLinks:
    experiment: str
    sweep: str
    trials: int
    runs: str
    compare: str


def sweep_links(uri: str, base: str) -> list[SweepLinks]:
    """For the newest run of each sweep in the store: links to its experiment's runs and to its trials compared."""
    client = MlflowClient(uri)
    links = []
    for experiment in client.search_experiments():
        parents = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` != ''",
                                     order_by=["attributes.start_time DESC"])
        seen: set[str] = set()
        for parent in parents:
            name = parent.data.tags[SWEEP_TAG]
            if name in seen:
                continue
            seen.add(name)
            children = client.search_runs(
                [experiment.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
                order_by=["attributes.start_time ASC"])
            links.append(SweepLinks(
                experiment.name, name, len(children),
                runs_url(base, experiment.experiment_id, with_view=VIEW_TAG in experiment.tags),
                compare_url(base, experiment.experiment_id, [c.info.run_id for c in children]),
            ))
    return links
