"""The `adaptune` command line. User errors (`ConfigError`) become one line and exit code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

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


@app.command()
def plan(
    spec_file: Annotated[Path, typer.Argument(help="a trial spec (YAML)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Count trainable and base parameters of a trial, from the model's config alone (no weights)."""
    from workers.adapters.registry import count_parameters, inject
    from workers.model_loading import build_model
    from workers.spec import load_trial_spec

    spec = load_trial_spec(spec_file)
    try:
        model = build_model(
            spec.model, overrides=spec.model_overrides, trust_remote_code=spec.trust_remote_code, device="meta"
        )
        inject(model, spec.adapter)
    except ConfigError as exc:
        raise exc.located(str(spec_file)) from None
    counts = count_parameters(model)
    result = {
        "model": spec.model,
        "model_type": model.config.model_type,
        "adapter": spec.adapter.type,
        "trainable_params": counts.trainable,
        "base_params": counts.base,
        "trainable_percent": round(counts.percent, 4),
    }
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo(f"{spec_file}: {result['model']} ({result['model_type']}), adapter {result['adapter']}")
    typer.echo(f"  trainable parameters  {counts.trainable:>16,}")
    typer.echo(f"  base parameters       {counts.base:>16,}")
    typer.echo(f"  trainable share       {counts.percent:>15.4f}%")


@app.command()
def trial(
    spec_file: Annotated[Path, typer.Argument(help="a trial spec (YAML)")],
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI")] = "sqlite:///mlflow.db",
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "adaptune-trials",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="default: runs/trials/<trial id>")] = None,
) -> None:
    """Fine-tune and evaluate one trial in this process (under torchrun: data-parallel); resumable."""
    import os

    from workers.job import run_trial, trial_id
    from workers.spec import load_trial_spec
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
    max_new_tokens: Annotated[int, typer.Option()] = 256,
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
