"""The commands that work on one model in this process: `plan`, `trial`, `eval`, `export`.

`orchestrator.cli` offers them beside the sweep commands. They import torch (but `plan`, which
counts on the meta device), each in its function: importing this module costs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli_shared import TRUST_REMOTE_CODE, check_store, writable_folder
from workers.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from workers.evaluate import EvalResult
    from workers.spec import EvalSpec, TrialSpec

EXPORT_FORMATS = ("peft",)


def _counts(spec: TrialSpec) -> dict[str, Any]:
    from workers.adapters.registry import count_parameters, inject
    from workers.model_loading import build_model
    from workers.names import BASE_PARAMS, TRAINABLE_PARAMS

    model = build_model(spec.model, overrides=spec.model_overrides, trust_remote_code=spec.trust_remote_code,
                        device="meta")
    inject(model, spec.adapter)
    counts = count_parameters(model)
    return {
        "model": spec.model,
        "model_type": model.config.model_type,
        "adapter": spec.adapter.type,
        TRAINABLE_PARAMS: counts.trainable,
        BASE_PARAMS: counts.base,
        "trainable_percent": round(counts.percent, 4),
        # bf16 weights + fp32 adapter, Adam moments and gradients: the floor before activations.
        "est_weights_gib": round((2 * counts.base + 16 * counts.trainable) / 2**30, 2),
    }


def _no_remote_code(spec: TrialSpec, file: Path) -> TrialSpec:
    """`spec` with trust_remote_code off: plan counts with the family's built-in code, never the folder's."""
    if not spec.trust_remote_code:
        return spec
    typer.echo(f"note: {file}: trust_remote_code: ignored; plan never runs a model folder's code", err=True)
    return spec.model_copy(update={"trust_remote_code": False})


def _plan_sweep(spec_file: Path, as_json: bool) -> None:
    from orchestrator.preflight import check_sweep
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


def plan(
    spec_file: Annotated[Path, typer.Argument(help="a trial spec or a sweep file (YAML)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Count trainable and base parameters from the model's config alone (no weights); sweeps per trial."""
    from orchestrator.preflight import check_trial
    from workers.spec import load_trial_spec, read_yaml

    if "space" in read_yaml(spec_file):
        _plan_sweep(spec_file, as_json)
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


def trial(
    spec_file: Annotated[Path, typer.Argument(help="a trial spec (YAML)")],
    tracking_uri: Annotated[str, typer.Option(help="MLflow tracking URI")] = "sqlite:///mlflow.db",
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "adaptune-trials",
    checkpoint_dir: Annotated[Path | None, typer.Option(help="default: runs/trials/<trial id>")] = None,
    trust_remote_code: Annotated[bool, TRUST_REMOTE_CODE] = False,
) -> None:
    """Fine-tune and evaluate one trial in this process (under torchrun: data-parallel); resumable."""
    import os

    import torch

    from orchestrator.preflight import check_trial, memory_bytes
    from workers.spec import load_trial_spec, trial_id

    spec = load_trial_spec(spec_file)
    check_trial(spec, str(spec_file), training=True, trust_remote_code=trust_remote_code, memory=memory_bytes(),
                gpus=float(torch.cuda.device_count()))
    check_store(tracking_uri, "--tracking-uri", None)
    ident = trial_id(spec)
    folder = checkpoint_dir or Path("runs") / "trials" / ident
    writable_folder(folder, "--checkpoint-dir", None)
    if spec.trust_remote_code:
        typer.echo(f"{spec_file}: trust_remote_code: running the Python files of {spec.model} "
                   f"(--trust-remote-code)", err=True)
    from workers.job import run_trial
    from workers.names import SPOOL
    from workers.redaction import redact_value
    from workers.tracking import MemoryTracker, MlflowTracker, TrialStatus

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


def _eval_spec(tasks: str, data_root: str | None, template: str, **settings: Any) -> tuple[EvalSpec, list[str], Path]:
    """The evaluation settings, the task names and the data folder, every set checked before a model loads."""
    from pydantic import ValidationError

    from workers.spec import EvalSpec, config_error_from
    from workers.tasks import data_root as resolve_root
    from workers.tasks import task, task_file

    try:
        spec = EvalSpec(**settings)
    except ValidationError as exc:
        raise config_error_from(exc, None, "eval") from None
    if template not in ("paper", "alpaca"):
        raise ConfigError(None, "--template", f"expected paper or alpaca, got {template!r}")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    root = resolve_root(data_root)
    for name in names:
        try:
            task(name)
        except ConfigError as exc:
            raise ConfigError(None, "--tasks", exc.message) from None
        task_file(name, root)
    return spec, names, root


def _check_weights(model: str, random_init: bool) -> None:
    from orchestrator.model_shape import WEIGHT_FILES, has_weights, looks_like_path

    if not random_init and looks_like_path(model) and not has_weights(Path(model).expanduser()):
        raise ConfigError(None, "--model", f"{model} has no weights ({', '.join(WEIGHT_FILES)}); "
                                           f"pass --random-init for random weights from its config")


def _model_with_adapter(model: str, adapter: Path | None, random_init: bool) -> nn.Module:
    """The base model on the GPU where there is one (bf16) or the CPU (fp32), with the adapter loaded."""
    import torch

    from workers.adapters.io import load_adapter, read_adapter_config
    from workers.model_loading import build_model

    if adapter is not None:
        read_adapter_config(adapter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    net = build_model(model, random_init=random_init, dtype=dtype, device=device)
    if adapter is not None:
        load_adapter(net, adapter)
    return net


def _print_eval(result: EvalResult, out: Path | None) -> None:
    for name, res in result.tasks.items():
        typer.echo(f"{name:<12} {res.accuracy:7.2%}  ({res.correct}/{res.total})")
    typer.echo(f"{'macro':<12} {result.macro_accuracy:7.2%}  "
               f"{result.generated_tokens / max(result.seconds, 1e-9):,.0f} generated tok/s")
    if out is not None:
        summary = {**result.metrics(), "generated_tokens": result.generated_tokens, "seconds": result.seconds}
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"predictions and results.json in {out}")


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
    spec, names, root = _eval_spec(tasks, data_root, template, protocol=protocol, scoring=scoring,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit)
    _check_weights(model, random_init)
    from workers.evaluate import evaluate
    from workers.model_loading import load_tokenizer

    net = _model_with_adapter(model, adapter, random_init)
    tok = load_tokenizer(tokenizer or model)
    result = evaluate(net, tok, names, spec, root=root, out_dir=out, template=template)
    _print_eval(result, out)


def export(
    adapter_dir: Annotated[Path, typer.Argument(help="an adapter folder saved by adaptune")],
    out: Annotated[Path, typer.Option(help="the folder to write")],
    export_format: Annotated[str, typer.Option("--format", help="peft: a LoRA adapter for peft.PeftModel")] = "peft",
    model: Annotated[str | None, typer.Option(
        help="the base model's hub id or folder (default: the base_model the adapter was saved with)")] = None,
) -> None:
    """Export an adapter to another library's format (LoRA to PEFT's); only the adapter's tensors are written."""
    import torch

    from workers.adapters.io import CONFIG_FILE, export_peft, load_adapter, read_adapter_config
    from workers.model_loading import build_model

    if export_format not in EXPORT_FORMATS:
        raise ConfigError(None, "--format", f"expected {' or '.join(EXPORT_FORMATS)}, got {export_format!r}")
    config = read_adapter_config(adapter_dir)
    config_file = str(adapter_dir / CONFIG_FILE)
    if config.type != "lora":  # checked before the base model is built
        raise ConfigError(config_file, "adapter.type", f"only LoRA exports to PEFT's format, not {config.type}")
    base = model or json.loads((adapter_dir / CONFIG_FILE).read_text()).get("base_model")
    if not base:
        raise ConfigError(config_file, "base_model", "names no base model: pass --model")
    writable_folder(out, "--out", None)
    # The export holds no base weight: the base is built from its config alone, with random weights.
    net = build_model(base, random_init=True, dtype=torch.float32, device="cpu")
    load_adapter(net, adapter_dir)
    export_peft(net, config, out, base_model=base)
    typer.echo(f"{adapter_dir} -> {out} ({export_format}: peft.PeftModel.from_pretrained(base, {str(out)!r}))")
