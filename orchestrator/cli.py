"""The `adaptune` command line. User errors (`ConfigError`) become one line and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from workers.errors import ConfigError

app = typer.Typer(
    name="adaptune",
    help="Sweeps of the LLM-Adapters adapter family on Ray Tune, DeepSpeed and MLflow.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """adaptune: plan, run, resume and report adapter sweeps; train or evaluate one trial."""


def _counts(spec: Any) -> dict[str, Any]:
    from workers.adapters.registry import count_parameters, inject
    from workers.model_loading import build_model

    model = build_model(spec.model, overrides=spec.model_overrides, trust_remote_code=spec.trust_remote_code,
                        device="meta")
    inject(model, spec.adapter)
    counts = count_parameters(model)
    return {
        "model": spec.model,
        "model_type": model.config.model_type,
        "adapter": spec.adapter.type,
        "trainable_params": counts.trainable,
        "base_params": counts.base,
        "trainable_percent": round(counts.percent, 4),
        # bf16 weights + fp32 adapter, Adam moments and gradients: the floor before activations.
        "est_weights_gib": round((2 * counts.base + 16 * counts.trainable) / 2**30, 2),
    }


@app.command()
def plan(
    spec_file: Annotated[Path, typer.Argument(help="a trial spec or a sweep file (YAML)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Count trainable and base parameters from the model's config alone (no weights); sweeps per trial."""
    from workers.spec import load_trial_spec, read_yaml

    if "space" in read_yaml(spec_file):
        from orchestrator.sweep import load_sweep

        sweep, points = load_sweep(spec_file)
        try:
            rows = [{"trial": p.name, **_counts(p.spec)} for p in points]
        except ConfigError as exc:
            raise exc.located(str(spec_file)) from None
        if as_json:
            typer.echo(json.dumps({"sweep": sweep.name, "trials": len(rows), "points": rows}))
            return
        typer.echo(f"{spec_file}: sweep {sweep.name}, {len(rows)} trials ({sweep.search.algorithm})")
        typer.echo(f"  {'trial':<40} {'trainable':>14}  {'share':>9}  memory floor")
        for row in rows:
            typer.echo(f"  {row['trial']:<40} {row['trainable_params']:>14,}  {row['trainable_percent']:>8.4f}%"
                       f"  ~{row['est_weights_gib']:g} GiB weights+optimizer")
        return
    spec = load_trial_spec(spec_file)
    try:
        result = _counts(spec)
    except ConfigError as exc:
        raise exc.located(str(spec_file)) from None
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{spec_file}: {result['model']} ({result['model_type']}), adapter {result['adapter']}")
    typer.echo(f"  trainable parameters  {result['trainable_params']:>16,}")
    typer.echo(f"  base parameters       {result['base_params']:>16,}")
    typer.echo(f"  trainable share       {result['trainable_percent']:>15.4f}%")


def _prepare_sweep(sweep_file: Path, *, new: bool, resume: bool) -> tuple[Any, list, Path]:
    """Validate everything a sweep needs before Ray starts: the file, the store, the storage."""
    import os
    import shutil
    import time

    from orchestrator.cluster import check_tracking
    from orchestrator.sweep import load_sweep
    from orchestrator.tune_driver import experiment_dir

    sweep, points = load_sweep(sweep_file)
    try:
        check_tracking(sweep.tracking.uri)
    except ConfigError as exc:
        raise ConfigError(str(sweep_file), "tracking.uri", exc.message) from None
    root = experiment_dir(sweep)
    parent = root.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(str(sweep_file), "storage", f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise ConfigError(str(sweep_file), "storage", f"{parent} is not writable")
    if root.exists() and not resume:
        if not new:
            raise ConfigError(str(sweep_file), "name",
                              f"a sweep named {sweep.name!r} exists in {root}: `adaptune resume {sweep.name}` "
                              "or pass --new to start over")
        shutil.move(root, root.with_name(f"{root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    if not sweep.resources.gpus_per_trial:
        return sweep, points, root
    import torch

    if torch.cuda.device_count() < sweep.resources.gpus_per_trial and os.environ.get("RAY_ADDRESS") is None:
        raise ConfigError(str(sweep_file), "resources.gpus_per_trial",
                          f"{sweep.resources.gpus_per_trial:g} GPUs per trial; this machine has "
                          f"{torch.cuda.device_count()} (pass --address for a cluster)")
    return sweep, points, root


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        acc = row.get("accuracy/macro")
        shown = f"{acc:.2%}" if isinstance(acc, float) else "-"
        typer.echo(f"  {row['trial']:<40} {row['status']:<10} accuracy {shown}")


@app.command()
def run(
    sweep_file: Annotated[Path, typer.Argument(help="a sweep file (YAML)")] = Path("sweeps/demo.yaml"),
    address: Annotated[str | None, typer.Option(help="a Ray cluster to join (default: a local one)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and list the trials, run nothing")] = False,
    new: Annotated[bool, typer.Option("--new", help="start over although a sweep of this name exists")] = False,
) -> None:
    """Run a sweep on Ray Tune; every trial is a nested MLflow run under the sweep's parent run."""
    if dry_run:
        from orchestrator.sweep import load_sweep

        sweep, points = load_sweep(sweep_file)
        typer.echo(f"{sweep_file}: sweep {sweep.name}, {len(points)} trials")
        for p in points:
            typer.echo(f"  {p.name}")
        return
    from orchestrator.tune_driver import run as run_sweep

    sweep, points, _ = _prepare_sweep(sweep_file, new=new, resume=False)
    rows = run_sweep(sweep, points, sweep_file, address=address, resume=False)
    _print_rows(rows)
    typer.echo(f"done: {len(rows)} trials in experiment {sweep.experiment!r} at {sweep.tracking.uri}")
    typer.echo("compare them: adaptune ui   (MLflow UI on http://127.0.0.1:5000)")


@app.command()
def resume(
    name: Annotated[str, typer.Argument(help="the sweep's name")],
    storage: Annotated[Path, typer.Option(help="where sweeps keep their state")] = Path("runs"),
    address: Annotated[str | None, typer.Option(help="a Ray cluster to join")] = None,
) -> None:
    """Finish an interrupted sweep: unfinished trials resume, errored ones re-run, finished ones stay."""
    from orchestrator.tune_driver import run as run_sweep

    saved = storage / name / "sweep.yaml"
    if not saved.is_file():
        raise ConfigError(str(saved), None, f"no sweep named {name!r} in {storage}")
    sweep, points, _ = _prepare_sweep(saved, new=False, resume=True)
    rows = run_sweep(sweep, points, saved, address=address, resume=True)
    _print_rows(rows)
    typer.echo(f"done: {len(rows)} trials; adaptune ui to compare them")


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="a sweep's name (default: every sweep)")] = None,
    storage: Annotated[Path, typer.Option(help="where sweeps keep their state")] = Path("runs"),
) -> None:
    """The trials of a sweep (or of every sweep in the storage) and their status, from MLflow."""
    from orchestrator.mlflow_sweep import sweep_status
    from orchestrator.sweep import load_sweep

    files = [storage / name / "sweep.yaml"] if name else sorted(storage.glob("*/sweep.yaml"))
    if name and not files[0].is_file():
        raise ConfigError(str(files[0]), None, f"no sweep named {name!r} in {storage}")
    for file in files:
        sweep, _ = load_sweep(file)
        found = sweep_status(sweep.tracking.uri, sweep.experiment, sweep.name)
        if found is None:
            typer.echo(f"{sweep.name}: no MLflow run yet")
            continue
        state, rows = found
        typer.echo(f"{sweep.name}: {state}, {len(rows)} trials")
        _print_rows(rows)


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="the sweep's name")],
    storage: Annotated[Path, typer.Option(help="where sweeps keep their state")] = Path("runs"),
    out: Annotated[Path | None, typer.Option(help="folder for plots and tables (default: <storage>/<name>/report)")]
    = None,
) -> None:
    """Configurations ranked with mean and 95% interval over seeds, the winner's margin, plots to a folder."""
    from rich.console import Console

    from orchestrator.mlflow_sweep import MlflowTrials, parent_run_id
    from orchestrator.report import collect, table, verdict, write_report
    from orchestrator.sweep import load_sweep

    saved = storage / name / "sweep.yaml"
    if not saved.is_file():
        raise ConfigError(str(saved), None, f"no sweep named {name!r} in {storage}")
    sweep, _ = load_sweep(saved)
    uri = sweep.tracking.uri
    parent = parent_run_id(uri, sweep.experiment, sweep.name)
    if parent is None:
        raise ConfigError(str(saved), "tracking", f"no MLflow run of sweep {name!r} in {uri} ({sweep.experiment})")
    summary = collect(MlflowTrials(uri, parent), metric=sweep.search.metric, mode=sweep.search.mode)
    path = write_report(summary, out or storage / name / "report")
    Console(width=max(Console().width, 140)).print(table(summary))
    typer.echo(verdict(summary))
    typer.echo(f"plots and tables: {path.parent}")


@app.command()
def ui(
    tracking_uri: Annotated[str, typer.Option(help="the MLflow store")] = "sqlite:///mlflow.db",
    port: Annotated[int, typer.Option(help="the port on 127.0.0.1")] = 5000,
) -> None:
    """The MLflow UI for the store, on 127.0.0.1 only; prints each sweep's links: its runs, its trials compared."""
    import subprocess

    from orchestrator.mlflow_views import sweep_links

    base = f"http://127.0.0.1:{port}"
    typer.echo(f"MLflow UI on {base} for {tracking_uri} (Ctrl-C to stop)")
    for link in sweep_links(tracking_uri, base):
        typer.echo(f"sweep {link.sweep} (experiment {link.experiment}, {link.trials} trials)")
        typer.echo(f"  runs:    {link.runs}")
        typer.echo(f"  compare: {link.compare}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
           "--port", str(port)]
    raise typer.Exit(subprocess.call(cmd))


@app.command()
def trial(
    spec_file: Annotated[Path, typer.Argument(help="a trial spec (YAML)")],
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI")] = "sqlite:///mlflow.db",
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "adaptune-trials",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="default: runs/trials/<trial id>")] = None,
) -> None:
    """Fine-tune and evaluate one trial in this process (under torchrun: data-parallel); resumable."""
    import os

    from workers.job import run_trial
    from workers.spec import load_trial_spec, trial_id
    from workers.tracking import MemoryTracker, MlflowTracker, TrialStatus, check_tracking_uri

    spec = load_trial_spec(spec_file)
    try:
        check_tracking_uri(tracking_uri)
    except ConfigError as exc:
        raise ConfigError("--tracking-uri", None, exc.message) from None
    ident = trial_id(spec)
    folder = checkpoint_dir or Path("runs") / "trials" / ident
    # Under torchrun every rank runs this command; only rank 0 writes the MLflow run.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tracker = (MlflowTracker(tracking_uri, experiment, spec.name or spec.adapter.short_name(), trial_id=ident)
               if rank0 else MemoryTracker())
    try:
        result = run_trial(spec, tracker, folder)
    except ConfigError as exc:
        raise exc.located(str(spec_file)) from None
    if not rank0:
        return
    typer.echo(f"{spec.adapter.short_name()}: {result.status}")
    for key, value in sorted(result.metrics.items()):
        typer.echo(f"  {key:<28} {value:.6g}")
    if result.status != TrialStatus.SUCCEEDED:
        typer.echo(f"  error: {result.error}", err=True)
        raise typer.Exit(1)
    typer.echo(f"adapter: {result.adapter_dir}   MLflow: {tracking_uri} (adaptune ui)")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="a hub id, or a folder with config.json")],
    tasks: Annotated[str, typer.Option(help="comma-separated task names, e.g. gsm8k,svamp")],
    adapter: Annotated[Path | None, typer.Option(help="an adapter folder saved by adaptune")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer (default: the model's); `byte` built in")] = None,
    random_init: Annotated[bool, typer.Option(help="random weights from the model's config")] = False,
    data_root: Annotated[str | None, typer.Option(help="data folder (default: $ADAPTUNE_DATA or ./data)")] = None,
    limit: Annotated[int | None, typer.Option(help="the first N questions of each set")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for predictions and results.json")] = None,
    protocol: Annotated[str, typer.Option(help="batched | paper (batch 1, beam search 4)")] = "batched",
    scoring: Annotated[str, typer.Option(help="paper | strict")] = "paper",
    max_new_tokens: Annotated[int | None, typer.Option(
        help="tokens to generate (default: 256 for math sets, 32 for the others, as the reference)")] = None,
    batch_size: Annotated[int, typer.Option()] = 32,
    template: Annotated[str, typer.Option(help="paper | alpaca prompt template")] = "paper",
) -> None:
    """Evaluate a base model (zero-shot) or a base model with an adapter on the paper's tasks."""
    import torch
    from pydantic import ValidationError

    from workers.adapters.io import load_adapter, read_adapter_config
    from workers.data import data_root as resolve_root
    from workers.data import task, task_file
    from workers.evaluate import evaluate
    from workers.model_loading import build_model, load_tokenizer
    from workers.spec import EvalSpec, config_error_from

    try:
        spec = EvalSpec(protocol=protocol, scoring=scoring, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, limit=limit)
    except ValidationError as exc:
        raise config_error_from(exc, None, "eval") from None
    if template not in ("paper", "alpaca"):
        raise ConfigError(None, "--template", f"expected paper or alpaca, got {template!r}")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    root = resolve_root(data_root)
    for name in names:  # every set is checked before the model loads
        task(name)
        task_file(name, root)
    if adapter is not None:
        read_adapter_config(adapter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    net = build_model(model, random_init=random_init, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(net, adapter)
    tok = load_tokenizer(tokenizer or model)
    result = evaluate(net, tok, names, spec, root=root, out_dir=out, template=template)
    for name, res in result.tasks.items():
        typer.echo(f"{name:<12} {res.accuracy:7.2%}  ({res.correct}/{res.total})")
    typer.echo(f"{'macro':<12} {result.macro_accuracy:7.2%}  "
               f"{result.generated_tokens / max(result.seconds, 1e-9):,.0f} generated tok/s")
    if out is not None:
        summary = {**result.metrics(), "generated_tokens": result.generated_tokens, "seconds": result.seconds}
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"predictions and results.json in {out}")


def main() -> None:
    """Entry point of the `adaptune` script."""
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
