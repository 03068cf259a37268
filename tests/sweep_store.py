"""A small sweep's MLflow store, made by the project's own code without Ray: the demo's task, 3 trials.

`start_parent` records the sweep, `run_trial` trains and evaluates each point in this process
(DeepSpeed, a few optimizer steps) under an `MlflowTracker` nested in it, and `finish_parent` closes
it with its report: the same records `adaptune run` writes, in about a minute on 2 busy cores.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest.mock import patch

from test_driver import tiny_sweep

REPO = Path(__file__).resolve().parents[1]
SPACE = [
    {"type": "lora", "placement": [["q", "v"]], "rank": 4},
    {"type": "series", "placement": [["attn"]], "bottleneck": 8},
    {"type": "prefix", "virtual_tokens": 4},
]


def sweep_file(folder: Path, name: str = "uisweep") -> Path:
    """The demo sweep cut down to 3 trials of 3 optimizer steps, 8 questions each, its store in `folder`."""
    return tiny_sweep(folder, name, SPACE, train={"warmup_steps": 1, "log_every": 1, "eval_every": 2,
                                                  "save_every": 100})


def build_store(folder: Path) -> str:
    """Run the small sweep into `folder/mlflow.db`; returns its tracking URI."""
    from mlflow import MlflowClient

    from orchestrator.mlflow_sweep import finish_parent, start_parent
    from orchestrator.sweep import load_sweep
    from workers.job import run_trial
    from workers.spec import trial_id
    from workers.tracking import MlflowTracker

    file = sweep_file(folder)
    sweep, points = load_sweep(file)
    uri = sweep.tracking.uri
    parent = start_parent(uri, sweep, file, points, resume=False)
    # Trials of 3 steps end within MLflow's sampling interval; a shorter one gives each run system metrics.
    with patch.dict(os.environ, {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.5"}):
        for point in points:
            tid = trial_id(point.spec)
            tracker = MlflowTracker(uri, sweep.experiment, point.name, trial_id=tid, parent_run_id=parent)
            run_trial(point.spec, tracker, folder / "runs" / "trials" / tid)
    finish_parent(uri, parent, failed=False, metric=sweep.search.metric, mode=sweep.search.mode)
    client = MlflowClient(uri)
    for run in client.search_runs([client.get_experiment_by_name(sweep.experiment).experiment_id]):
        if run.info.run_id != parent:
            assert "system/cpu_utilization_percentage" in run.data.metrics, f"{run.info.run_name}: no system metrics"
    return uri
