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


def main() -> None:
    """Entry point of the `adaptune` script."""
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
