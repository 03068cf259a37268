"""The `adaptune` command line. User errors (`ConfigError`) become one line and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

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


def _no_remote_code(spec: Any, file: Path) -> Any:
    """`spec` with trust_remote_code off: plan counts with the family's built-in code, never the folder's."""
    if not spec.trust_remote_code:
        return spec
    typer.echo(f"note: {file}: trust_remote_code: ignored; plan never runs a model folder's code", err=True)
    return spec.model_copy(update={"trust_remote_code": False})


@app.command()
def plan(
    spec_file: Annotated[Path, typer.Argument(help="a trial spec or a sweep file (YAML)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Count trainable and base parameters from the model's config alone (no weights); sweeps per trial."""
    from orchestrator.preflight import check_sweep, check_trial
    from workers.spec import load_trial_spec, read_yaml

    if "space" in read_yaml(spec_file):
        from orchestrator.sweep import load_sweep

        sweep, points = load_sweep(spec_file)
        points = [p.model_copy(update={"spec": _no_remote_code(p.spec, spec_file)}) for p in points]
        check_sweep(sweep, points, str(spec_file), training=False, trust_remote_code=False)
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
    spec = _no_remote_code(load_trial_spec(spec_file), spec_file)
    check_trial(spec, str(spec_file), training=False, trust_remote_code=False)
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


def _writable_folder(folder: Path, file: str, field: str | None) -> None:
    """`folder` can be created (or is) a writable folder; checked without creating anything."""
    import os

    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(file, field, f"{existing} is a file; expected a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(file, field, f"{existing} is not writable")


def _check_store(uri: str, file: str, field: str | None = "tracking.uri") -> None:
    """The tracking store answers (within seconds) and, where it is an SQLite file, is MLflow's."""
    from orchestrator.cluster import check_tracking
    from orchestrator.preflight import check_store

    try:
        check_tracking(uri)
        check_store(uri)
    except ConfigError as exc:
        raise ConfigError(file, field, exc.message) from None


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
    _check_store(sweep.tracking.uri, file)
    root = experiment_dir(sweep)
    _writable_folder(root.parent, file, "storage")
    if root.exists() and not resume and not new:
        raise ConfigError(file, "name", f"a sweep named {sweep.name!r} exists in {root}: `adaptune resume "
                                        f"{sweep.name}` or pass --new to start over")
    if sweep.resources.gpus_per_trial and local:
        import torch

        if torch.cuda.device_count() < sweep.resources.gpus_per_trial:
            raise ConfigError(file, "resources.gpus_per_trial",
                              f"{sweep.resources.gpus_per_trial:g} GPUs per trial; this machine has "
                              f"{torch.cuda.device_count()} (pass --address for a cluster)")
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


def _finish(sweep: Any, rows: list[dict[str, Any]], failures: list[tuple[str, str]]) -> None:
    """The closing lines of `run` and `resume`: every trial, then the failed ones with their causes (exit 1)."""
    from workers.tracking import redact_text, redact_value

    _print_rows(rows)
    typer.echo(f"done: {len(rows)} trials in experiment {sweep.experiment!r} at {redact_value(sweep.tracking.uri)}")
    if failures:
        typer.echo(f"failed: {len(failures)} trials", err=True)
        width = max(len(name) for name, _ in failures)
        for name, cause in failures:
            typer.echo(f"  {name:<{width}}  {redact_text(cause)}", err=True)
        raise typer.Exit(1)
    typer.echo("compare them: adaptune ui   (MLflow UI on http://127.0.0.1:5000)")


def _print_rows(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        acc = row.get("accuracy/macro")
        shown = f"{acc:.2%}" if isinstance(acc, float) else "-"
        typer.echo(f"  {row['trial']:<40} {row['status']:<10} accuracy {shown}")


TRUST_REMOTE_CODE = typer.Option("--trust-remote-code",
                                 help="allow trials whose file sets trust_remote_code to run their model folder's code")


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
    rows, failures = run_sweep(sweep, points, sweep_file, address=address, resume=False)
    _finish(sweep, rows, failures)


def _saved_sweep(name: str, storage: Path) -> Path:
    """The copy of sweep `name` in `storage`, or a `ConfigError`."""
    from workers.spec import safe_name

    try:
        safe_name(name)
    except ValueError as exc:
        raise ConfigError(None, "NAME", f"{exc} (got {name!r})") from None
    saved = storage / name / "sweep.yaml"
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
    from workers.spec import read_yaml
    from workers.tracking import REDACTED

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

    rows, failures = run_sweep(sweep, points, saved, address=address, resume=True)
    _finish(sweep, rows, failures)


@app.command()
def status(
    name: Annotated[str | None, typer.Argument(help="a sweep's name (default: every sweep)")] = None,
    storage: Annotated[Path, typer.Option(help="where sweeps keep their state")] = Path("runs"),
) -> None:
    """The trials of a sweep (or of every sweep in the storage) and their status, from MLflow."""
    from orchestrator.mlflow_sweep import sweep_status
    from orchestrator.sweep import load_sweep

    files = [_saved_sweep(name, storage)] if name else sorted(storage.glob("*/sweep.yaml"))
    for file in files:
        sweep, _ = load_sweep(file)
        if _missing_store(sweep.tracking.uri):
            typer.echo(f"{sweep.name}: no MLflow run yet")
            continue
        _check_store(sweep.tracking.uri, str(file))
        found = sweep_status(sweep.tracking.uri, sweep.experiment, sweep.name)
        if found is None:
            typer.echo(f"{sweep.name}: no MLflow run yet")
            continue
        state, rows = found
        typer.echo(f"{sweep.name}: {state}, {len(rows)} trials")
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
    from workers.tracking import redact_value

    saved = _saved_sweep(name, storage)
    sweep, _ = load_sweep(saved)
    uri = sweep.tracking.uri
    if not _missing_store(uri):
        _check_store(uri, str(saved))
    parent = None if _missing_store(uri) else parent_run_id(uri, sweep.experiment, sweep.name)
    if parent is None:
        raise ConfigError(str(saved), "tracking", f"no MLflow run of sweep {name!r} in {redact_value(uri)} "
                                                  f"({sweep.experiment})")
    summary = collect(MlflowTrials(uri, parent), metric=sweep.search.metric, mode=sweep.search.mode)
    path = write_report(summary, out or storage / name / "report")
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
    import subprocess

    from orchestrator.mlflow_views import sweep_links
    from workers.tracking import redact_value

    base = f"http://127.0.0.1:{port}"
    typer.echo(f"MLflow UI on {base} for {redact_value(tracking_uri)} (Ctrl-C to stop)")
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
    trust_remote_code: Annotated[bool, TRUST_REMOTE_CODE] = False,
) -> None:
    """Fine-tune and evaluate one trial in this process (under torchrun: data-parallel); resumable."""
    import os

    from orchestrator.preflight import check_trial, memory_bytes
    from workers.spec import load_trial_spec, trial_id

    spec = load_trial_spec(spec_file)
    import torch

    check_trial(spec, str(spec_file), training=True, trust_remote_code=trust_remote_code, memory=memory_bytes(),
                gpus=float(torch.cuda.device_count()))
    _check_store(tracking_uri, "--tracking-uri", None)
    ident = trial_id(spec)
    folder = checkpoint_dir or Path("runs") / "trials" / ident
    _writable_folder(folder, "--checkpoint-dir", None)
    if spec.trust_remote_code:
        typer.echo(f"{spec_file}: trust_remote_code: running the Python files of {spec.model} "
                   f"(--trust-remote-code)", err=True)
    from workers.job import run_trial
    from workers.tracking import SPOOL, MemoryTracker, MlflowTracker, TrialStatus, redact_value

    # Under torchrun every rank runs this command; only rank 0 writes the MLflow run.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    tracker = (MlflowTracker(tracking_uri, experiment, spec.name or spec.adapter.short_name(), trial_id=ident,
                             spool_dir=folder / SPOOL)
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
    typer.echo(f"adapter: {result.adapter_dir}   MLflow: {redact_value(tracking_uri)} (adaptune ui)")


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
    from pydantic import ValidationError

    from orchestrator.model_shape import WEIGHT_FILES, has_weights, looks_like_path
    from workers.spec import EvalSpec, config_error_from
    from workers.tasks import data_root as resolve_root
    from workers.tasks import task, task_file

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
        try:
            task(name)
        except ConfigError as exc:
            raise ConfigError(None, "--tasks", exc.message) from None
        task_file(name, root)
    if not random_init and looks_like_path(model) and not has_weights(Path(model).expanduser()):
        raise ConfigError(None, "--model", f"{model} has no weights ({', '.join(WEIGHT_FILES)}); "
                                           f"pass --random-init for random weights from its config")
    import torch

    from workers.adapters.io import load_adapter, read_adapter_config
    from workers.evaluate import evaluate
    from workers.model_loading import build_model, load_tokenizer

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
