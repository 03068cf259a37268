"""The `adaptune` command line. User errors (`ConfigError`) become one line and exit code 2."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import yaml

from orchestrator import worker_commands
from orchestrator.cli_shared import TRUST_REMOTE_CODE, check_store, writable_folder
from orchestrator.heartbeat import beating
from workers.errors import ConfigError
from workers.names import HEARTBEAT, MACRO_ACCURACY, REPORT_ARTIFACT, SWEEP_FILE

if TYPE_CHECKING:
    from orchestrator.tune_driver import SweepEnd

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


# The worker commands (one model in this process) live in `orchestrator.worker_commands`; the help lists
# `plan` first, the sweep commands, then the others.
app.command()(worker_commands.plan)


def _prepare_sweep(sweep_file: Path, *, new: bool, resume: bool, trust_remote_code: bool,
                   address: str | None) -> tuple[Any, list, Path]:
    """Check everything a sweep needs before Ray starts, writing nothing: the file, every trial's model,
    adapter and data (the pre-flight), the tracking store, the storage, the GPUs."""
    import os

    from orchestrator.preflight import check_sweep, memory_bytes
    from orchestrator.sweep import experiment_dir, load_sweep

    file = str(sweep_file)
    sweep, points = load_sweep(sweep_file)
    local = (address or os.environ.get("RAY_ADDRESS") or "local") == "local"
    check_sweep(sweep, points, file, training=True, trust_remote_code=trust_remote_code,
                memory=memory_bytes() if local else None)
    check_store(sweep.tracking.uri, file)
    root = experiment_dir(sweep)
    writable_folder(root.parent, file, "storage")
    if root.exists() and not resume and not new:
        raise ConfigError(file, "name", f"a sweep named {sweep.name!r} exists in {root}: `adaptune resume "
                                        f"{sweep.name}` or pass --new to start over")
    if beating(root / HEARTBEAT):
        raise ConfigError(file, "name", f"sweep {sweep.name!r} is running: its driver beats in {root / HEARTBEAT}; "
                                        "let it end or stop it (Ctrl-C) first")
    r = sweep.resources
    if r.gpus_per_trial and local:
        from orchestrator.gpus import visible_gpus

        gpus, need = visible_gpus(), r.gpus_per_trial * r.workers_per_trial
        if gpus < need:
            raise ConfigError(file, "resources.gpus_per_trial",
                              f"{need:g} GPUs per trial ({r.workers_per_trial} workers x {r.gpus_per_trial:g}); "
                              f"this machine has {gpus} (pass --address for a cluster)")
    if trust_remote_code and any(p.spec.trust_remote_code for p in points):
        typer.echo(f"{sweep_file}: trust_remote_code: the trials will run the Python files of their model "
                   f"folders (--trust-remote-code)", err=True)
    return sweep, points, root


def _make_storage(root: Path, file: str) -> None:
    """After every check, the sweep's storage folder; `--new` keeps an old sweep's folder under a dated name."""
    import shutil
    import time

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(file, "storage", f"cannot create {root.parent}: {exc.strerror}") from None
    if root.exists():
        shutil.move(root, root.with_name(f"{root.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))


def _finish(sweep: Any, end: SweepEnd) -> None:
    """The closing lines of `run` and `resume`: every trial, then the failed ones with their causes (exit 1), or,
    when the sweep was interrupted before its trials ended, how many did not and the command that continues them
    (exit 130, a shell's code for Ctrl-C)."""
    from orchestrator.sweep import experiment_dir
    from workers.redaction import redact_text, redact_value

    _print_rows(end.rows)
    where = f"in experiment {sweep.experiment!r} at {redact_value(sweep.tracking.uri)}"
    if end.unfinished:
        typer.echo(f"interrupted: {len(end.rows)} trials {where}", err=True)
    else:
        typer.echo(f"done: {len(end.rows)} trials {where}")
    if end.failures:
        typer.echo(f"failed: {len(end.failures)} trials", err=True)
        width = max(len(name) for name, _ in end.failures)
        for name, cause in end.failures:
            typer.echo(f"  {name:<{width}}  {redact_text(cause)}", err=True)
    if end.unfinished:
        storage = experiment_dir(sweep).parent
        typer.echo(f"unfinished: {end.unfinished} trials; continue them: adaptune resume {sweep.name} "
                   f"--storage {shlex.quote(str(storage))}", err=True)
        raise typer.Exit(130)
    if end.failures:
        raise typer.Exit(1)
    typer.echo("compare them: adaptune ui   (MLflow UI on http://127.0.0.1:5000)")


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        acc = row.get(MACRO_ACCURACY)
        shown = f"{acc:.2%}" if isinstance(acc, float) else "-"
        typer.echo(f"  {row['trial']:<40} {row['status']:<10} accuracy {shown}")


@app.command()
def run(
    sweep_file: Annotated[Path, typer.Argument(help="a sweep file (YAML)")] = Path("sweeps/demo.yaml"),
    address: Annotated[str | None, typer.Option(help="a Ray cluster to join (default: a local one)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="validate and list the trials, run nothing")] = False,
    new: Annotated[bool, typer.Option("--new", help="start over although a sweep of this name exists")] = False,
    trust_remote_code: Annotated[bool, TRUST_REMOTE_CODE] = False,
) -> None:
    """Run a sweep on Ray Tune; every trial is a nested MLflow run under the sweep's parent run."""
    sweep, points, root = _prepare_sweep(sweep_file, new=new, resume=False, trust_remote_code=trust_remote_code,
                                         address=address)
    if dry_run:
        typer.echo(f"{sweep_file}: sweep {sweep.name}, {len(points)} trials")
        for p in points:
            typer.echo(f"  {p.name}")
        return
    from orchestrator.tune_driver import run as run_sweep

    _make_storage(root, str(sweep_file))
    _finish(sweep, run_sweep(sweep, points, sweep_file, address=address, resume=False))


def _saved_sweep(name: str, storage: Path) -> Path:
    """The copy of sweep `name` in `storage`, or a `ConfigError`."""
    from workers.spec import safe_name

    try:
        safe_name(name)
    except ValueError as exc:
        raise ConfigError(None, "NAME", f"{exc} (got {name!r})") from None
    saved = storage / name / SWEEP_FILE
    if not saved.is_file():
        raise ConfigError(str(saved), None, f"no sweep named {name!r} in {storage}")
    return saved


@app.command()
def resume(
    name: Annotated[str, typer.Argument(help="the sweep's name")],
    storage: Annotated[Path, typer.Option(help="where sweeps keep their state")] = Path("runs"),
    address: Annotated[str | None, typer.Option(help="a Ray cluster to join")] = None,
    trust_remote_code: Annotated[bool, TRUST_REMOTE_CODE] = False,
    sweep_file: Annotated[Path | None, typer.Option("--sweep", help="the original sweep file, when it holds "
                                                                     "secrets (the saved copy has them removed)")]
    = None,
) -> None:
    """Finish an interrupted sweep: unfinished trials resume, errored ones re-run, finished ones stay."""
    from orchestrator.sweep import redacted_text
    from workers.redaction import REDACTED
    from workers.spec import read_yaml

    saved = _saved_sweep(name, storage)
    if sweep_file is not None:
        if yaml.safe_load(redacted_text(sweep_file)) != read_yaml(saved):
            raise ConfigError(str(sweep_file), None, f"is not the file sweep {name!r} was started with ({saved})")
        saved = sweep_file
    elif REDACTED in saved.read_text():
        raise ConfigError(str(saved), None, "the saved copy has its secrets removed: pass the original file "
                                            f"with `adaptune resume {name} --sweep FILE`")
    sweep, points, _ = _prepare_sweep(saved, new=False, resume=True, trust_remote_code=trust_remote_code,
                                      address=address)
    from orchestrator.tune_driver import run as run_sweep

    _finish(sweep, run_sweep(sweep, points, saved, address=address, resume=True))


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="a sweep's name (default: every sweep)")] = None,
    storage: Annotated[Path, typer.Option(help="where sweeps keep their state")] = Path("runs"),
) -> None:
    """The trials of a sweep (or of every sweep in the storage) and their status, from MLflow; a sweep MLflow has
    RUNNING whose driver is gone (killed, its machine lost: nothing closed its run), as interrupted."""
    from orchestrator.mlflow_sweep import sweep_status
    from orchestrator.sweep import load_sweep

    files = [_saved_sweep(name, storage)] if name else sorted(storage.glob("*/sweep.yaml"))
    for file in files:
        sweep, _ = load_sweep(file)
        if _missing_store(sweep.tracking.uri):
            typer.echo(f"{sweep.name}: no MLflow run yet")
            continue
        check_store(sweep.tracking.uri, str(file))
        found = sweep_status(sweep.tracking.uri, sweep.experiment, sweep.name)
        if found is None:
            typer.echo(f"{sweep.name}: no MLflow run yet")
            continue
        state, interrupted, rows = found
        if state == "RUNNING" and not beating(file.parent / HEARTBEAT):
            state, interrupted = "RUNNING in MLflow, its driver gone", f"adaptune resume {sweep.name}"
        typer.echo(f"{sweep.name}: {state}, {len(rows)} trials" + (f" ({interrupted})" if interrupted else ""))
        _print_rows(rows)


def _missing_store(uri: str) -> bool:
    """An SQLite store whose file does not exist (reading it would create it)."""
    return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).expanduser().exists()


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
    from orchestrator.report import collect, table, unfinished, verdict, write_report
    from orchestrator.sweep import load_sweep
    from workers.redaction import redact_value

    saved = _saved_sweep(name, storage)
    sweep, _ = load_sweep(saved)
    uri = sweep.tracking.uri
    if not _missing_store(uri):
        check_store(uri, str(saved))
    parent = None if _missing_store(uri) else parent_run_id(uri, sweep.experiment, sweep.name)
    if parent is None:
        raise ConfigError(str(saved), "tracking", f"no MLflow run of sweep {name!r} in {redact_value(uri)} "
                                                  f"({sweep.experiment})")
    summary = collect(MlflowTrials(uri, parent), metric=sweep.search.metric, mode=sweep.search.mode)
    path = write_report(summary, out or storage / name / REPORT_ARTIFACT)
    Console(width=max(Console().width, 140)).print(table(summary))
    typer.echo(verdict(summary))
    if failed := unfinished(summary):
        typer.echo("did not finish: " + ", ".join(f"{t.name} ({t.status})" for t in failed))
    typer.echo(f"plots and tables: {path.parent}")


@app.command()
def ui(
    tracking_uri: Annotated[str, typer.Option(help="the MLflow store")] = "sqlite:///mlflow.db",
    port: Annotated[int, typer.Option(help="the port on 127.0.0.1")] = 5000,
) -> None:
    """The MLflow UI for the store, on 127.0.0.1 only; prints each sweep's links: its runs, its trials compared."""
    from orchestrator.mlflow_views import sweep_links
    from workers.redaction import redact_value

    base = f"http://127.0.0.1:{port}"
    typer.echo(f"MLflow UI on {base} for {redact_value(tracking_uri)} (Ctrl-C to stop)")
    for link in sweep_links(tracking_uri, base):
        typer.echo(f"sweep {link.sweep} (experiment {link.experiment}, {link.trials} trials)")
        typer.echo(f"  runs:    {link.runs}")
        typer.echo(f"  compare: {link.compare}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
           "--port", str(port)]
    # MLflow's job runner (GenAI jobs: trace rollups, judges) starts 4 more processes that a sweep's
    # runs never use; set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to have it.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    # The UI becomes this process: a signal to `adaptune ui` reaches the server (as a child it was left running).
    sys.stdout.flush()
    os.execve(sys.executable, cmd, env)


app.command()(worker_commands.trial)
app.command("eval")(worker_commands.eval_command)
app.command()(worker_commands.export)


def main() -> None:
    """Entry point of the `adaptune` script."""
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
