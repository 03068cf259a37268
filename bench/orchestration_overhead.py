"""What the sweep driver costs: the same N small trials by `run_trial` in a loop and by `adaptune run`.

Prints one JSON object. Both sides are fresh processes timed from their start (imports included)
and write MLflow runs into their own sqlite store; a trial "starts" when its MLflow run is created,
right before `run_trial`, and ends when the run is closed. Where the time goes, per side: until the
first trial starts, inside the trials' runs, between one trial's end and the next one's start, and
after the last (for the sweep: the parent run's summary, the report, Ray's shutdown). The sweep
runs one trial at a time (`cpus_per_worker` = every CPU), so the difference is orchestration alone.

Two passes, as a user meets them: `cold`, the first run after an install, whose every process
compiles the Python it imports to bytecode (an install by `uv`, as `make venv`'s, compiles none;
a machine that sets PYTHONDONTWRITEBYTECODE, as some containers do, is cold on every run); `warm`,
every later run, with that bytecode cached. Each side keeps its bytecode in its own folder
(PYTHONPYCACHEPREFIX; Ray's processes inherit it), empty before the cold pass.

    python bench/orchestration_overhead.py                 # 4 trials of a tiny random LLaMA on CPU
    python bench/orchestration_overhead.py --trials 8 --steps 8

Goal (issue 6): at most 1 s per trial beyond the job itself, and the first trial started at most
10 s after the command; judged on the warm pass. `overhead_per_trial_s` spreads the once-per-sweep
costs (`fixed_overhead_s`: Ray's start, Tune's set-up and tear-down, the report) over the trials;
`overhead_per_trial_beyond_fixed_s` is what each further trial adds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_inputs(folder: Path, trials: int, steps: int) -> Path:
    """A tiny true/false task and a sweep of `trials` seeds of one LoRA trial over it."""
    records = [{"instruction": f"Is {n} an even number?", "input": "", "output": str(n % 2 == 0).lower(),
                "answer": str(n % 2 == 0).lower()} for n in range(64)]
    (folder / "train.json").write_text(json.dumps(records))
    (folder / "test.json").write_text(json.dumps(records[:8]))
    sweep = {
        "name": "bench-overhead",
        "base": {"model": str(REPO / "sweeps" / "models" / "tiny-llama"), "random_init": True, "tokenizer": "byte",
                 "data": {"train": str(folder / "train.json"), "eval": [str(folder / "test.json")],
                          "template": "alpaca", "cutoff_len": 128, "val_set_size": 8, "allow_leakage": True},
                 "eval": {"max_new_tokens": 4, "limit": 8}},
        "train": {"max_steps": steps, "micro_batch_size": 8, "batch_size": 8, "warmup_steps": 0, "log_every": 2,
                  "eval_every": 2, "save_every": steps},
        "seed": list(range(trials)),
        "space": [{"type": "lora", "placement": [["q", "v"]], "rank": 4}],
        "resources": {"cpus_per_worker": os.cpu_count() or 1},
        "tracking": {"uri": f"sqlite:///{folder / 'sweep.db'}", "experiment": "bench"},
        "storage": str(folder / "runs"),
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def loop(sweep_file: Path, uri: str, work: Path) -> None:
    """The baseline, run in its own process: every trial of the sweep by `run_trial`, one after another."""
    from orchestrator.sweep import load_sweep
    from workers.job import run_trial
    from workers.tracking import MlflowTracker, TrialStatus

    _, points = load_sweep(sweep_file)
    for point in points:
        tracker = MlflowTracker(uri, "bench", point.name, trial_id=f"loop:{point.name}")
        result = run_trial(point.spec, tracker, work / point.name)
        if result.status != TrialStatus.SUCCEEDED:
            raise SystemExit(f"{point.name}: {result.error}")


def runs(uri: str) -> list[Any]:
    from mlflow import MlflowClient

    from workers.names import PARENT_TAG, SWEEP_TAG

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    found = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in found if PARENT_TAG in r.data.tags or SWEEP_TAG not in r.data.tags]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(epoch start, wall seconds) of a command that must succeed."""
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{tail}")
    return start, time.time() - start


def side_env(bytecode: Path) -> dict[str, str]:
    """The environment of one side's processes: this checkout, and Python's bytecode cache in `bytecode`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONPYCACHEPREFIX": str(bytecode)}


def one_pass(folder: Path, trials: int, steps: int, bytecode: dict[str, Path]) -> dict[str, Any]:
    """Both sides once, each from its own sweep file and store under `folder`; their figures and the ratios."""
    folder.mkdir()
    sweep_file = write_inputs(folder, trials, steps)
    loop_uri = f"sqlite:///{folder / 'loop.db'}"
    loop_start, loop_wall = timed([sys.executable, __file__, "--loop", str(sweep_file), loop_uri,
                                   str(folder / "loop")], side_env(bytecode["loop"]))
    sweep_start, sweep_wall = timed([sys.executable, "-m", "orchestrator.cli", "run", str(sweep_file)],
                                    side_env(bytecode["sweep"]))
    sides = {}
    for side, uri, start, wall in (("loop", loop_uri, loop_start, loop_wall),
                                   ("sweep", f"sqlite:///{folder / 'sweep.db'}", sweep_start, sweep_wall)):
        children = runs(uri)
        if len(children) != trials:
            raise SystemExit(f"{side}: {len(children)} MLflow runs, expected {trials}")
        spans = sorted((r.info.start_time / 1000, r.info.end_time / 1000) for r in children)
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
        sides[side] = {
            "wall_s": round(wall, 2), "per_trial_s": round(wall / trials, 2),
            "first_trial_start_s": round(spans[0][0] - start, 2),
            "trial_run_s": round(statistics.fmean(e - b for b, e in spans), 2),
            "between_trials_s": round(statistics.fmean(gaps), 2) if gaps else 0.0,
            "after_last_trial_s": round(start + wall - spans[-1][1], 2),
        }
    loop_, sweep_ = sides["loop"], sides["sweep"]
    overhead = (sweep_["wall_s"] - loop_["wall_s"]) / trials
    # Paid once per sweep (Ray's start and shutdown, Tune's set-up, the report) vs. paid by every trial.
    fixed = (sweep_["first_trial_start_s"] - loop_["first_trial_start_s"]
             + sweep_["after_last_trial_s"] - loop_["after_last_trial_s"])
    return {
        "loop": loop_, "sweep": sweep_,
        "overhead_per_trial_s": round(overhead, 2),
        "fixed_overhead_s": round(fixed, 2),
        "overhead_per_trial_beyond_fixed_s": round(overhead - fixed / trials, 2),
        "sweep_over_loop": round(sweep_["wall_s"] / loop_["wall_s"], 3),
    }


def measure(trials: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        bytecode = {side: Path(tmp) / "bytecode" / side for side in ("loop", "sweep")}
        passes = {name: one_pass(Path(tmp) / name, trials, steps, bytecode) for name in ("cold", "warm")}
    warm = passes["warm"]
    return {
        "benchmark": "orchestration_overhead", "trials": trials, "steps_per_trial": steps, "cpus": os.cpu_count(),
        **passes,
        "goals": {"overhead_per_trial_le_1s": warm["overhead_per_trial_s"] <= 1.0,
                  "first_trial_start_le_10s": warm["sweep"]["first_trial_start_s"] <= 10.0},
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--loop":
        loop(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per trial")
    args = parser.parse_args()
    print(json.dumps(measure(args.trials, args.steps), indent=2))


if __name__ == "__main__":
    main()
