"""One trial: fine-tune with DeepSpeed, evaluate, save, record. A plain function, no Ray needed.

    run_trial(spec, tracker, checkpoint_dir) -> TrialResult

Given a `checkpoint_dir` that holds a checkpoint of the same spec, the trial resumes from it.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from workers.errors import ConfigError
from workers.repo_paths import relative_paths, repo_relative
from workers.spec import RESUMABLE_CHANGES, TrialSpec, trial_id
from workers.tracking import ERROR_TAG, Tracker, TrialStatus, redact

# report(metrics, checkpoint): at every log point and at the end; `checkpoint` is the newest checkpoint
# on disk then (it may predate the metrics' step), or None.
Report = Callable[[dict[str, float], Path | None], None]


@dataclass
class TrialResult:
    status: TrialStatus
    metrics: dict[str, float]
    adapter_dir: Path | None = None
    error: str | None = None


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_resumable(spec: TrialSpec, checkpoint_dir: Path) -> None:
    """Record the spec next to the checkpoints; refuse to resume a checkpoint of another spec."""
    recorded = checkpoint_dir / "spec.json"
    current = redact(spec.model_dump(mode="json", exclude=RESUMABLE_CHANGES))  # no secret on disk
    if recorded.is_file():
        differing = _diff(json.loads(recorded.read_text()), current)
        if differing:
            raise ConfigError(
                str(recorded), None,
                f"the checkpoints here come from a different spec (fields differ: {', '.join(differing)}); "
                "use another checkpoint directory or the original spec",
            )
    else:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        recorded.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")


def _memory_figures() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    free, total = torch.cuda.mem_get_info()
    return (f"allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, reserved "
            f"{torch.cuda.memory_reserved() / 2**30:.2f} GiB, peak {torch.cuda.max_memory_allocated() / 2**30:.2f}"
            f" GiB, free {free / 2**30:.2f} of {total / 2**30:.2f} GiB")


def one_line(exc: BaseException) -> str:
    """`Type: message` of an error; where it was raised when it has no message (`StopIteration`)."""
    text = str(exc).strip().splitlines()
    if text:
        return f"{type(exc).__name__}: {text[0]}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(exc).__name__} (no message){where}"


def run_trial(
    spec: TrialSpec,
    tracker: Tracker,
    checkpoint_dir: Path,
    *,
    report: Report | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrialResult:
    """Fine-tune, evaluate and record one trial; resume from `checkpoint_dir` when it holds a checkpoint.

    The spec's parameters are logged first, before anything that can fail, so every run can be told
    apart by them. User errors (`ConfigError`) propagate after the run is marked failed; CUDA running
    out of memory is reported as OOM with the memory figures and is not retried.
    """
    from workers.provenance import provenance

    checkpoint_dir = Path(checkpoint_dir)
    info = provenance()
    tracker.log_params(relative_paths({**spec.model_dump(mode="json"), "provenance": info}))
    try:
        check_resumable(spec, checkpoint_dir)
        return _run(spec, tracker, checkpoint_dir, info, report, should_stop)
    except torch.OutOfMemoryError as exc:
        error = f"out of memory: {str(exc).splitlines()[0]} ({_memory_figures()})"
        tracker.set_tags({ERROR_TAG: error[:5000]})
        tracker.finish(TrialStatus.OOM)
        return TrialResult(TrialStatus.OOM, {}, error=error)
    except KeyboardInterrupt:
        tracker.finish(TrialStatus.CANCELLED)
        return TrialResult(TrialStatus.CANCELLED, {}, error="interrupted")
    except ConfigError as exc:
        tracker.set_tags({ERROR_TAG: str(exc)[:5000]})
        tracker.finish(TrialStatus.FAILED)
        raise
    except Exception as exc:
        error = "".join(traceback.format_exception(exc))
        tracker.set_tags({ERROR_TAG: error[-5000:]})
        tracker.finish(TrialStatus.FAILED)
        return TrialResult(TrialStatus.FAILED, {}, error=one_line(exc))


def _run(
    spec: TrialSpec, tracker: Tracker, checkpoint_dir: Path, info: dict[str, str], report: Report | None,
    should_stop: Callable[[], bool] | None,
) -> TrialResult:
    from workers.adapters.io import save_adapter
    from workers.adapters.registry import count_parameters, finalize, inject
    from workers.data import build_train_data
    from workers.evaluate import evaluate
    from workers.model_loading import build_model, eight_bit_config, load_tokenizer
    from workers.run_inputs import trial_datasets
    from workers.tasks import data_root
    from workers.train import Trainer, resolve_precision, seed_everything

    on_gpu = torch.cuda.is_available()
    dtype = resolve_precision(spec.train.precision, on_gpu)
    if spec.load_in_8bit:
        eight_bit_config()  # no GPU or no bitsandbytes: refused before any data work
    tokenizer = load_tokenizer(spec.tokenizer or spec.model, spec.trust_remote_code)
    data = build_train_data(spec.data, tokenizer, spec.seed)
    seed_everything(spec.seed)
    # An 8-bit base is quantized as it loads, and a random one initialised, on this rank's GPU (a 7B random
    # init takes minutes on a CPU); any other loads on the CPU and the trainer moves it.
    on_rank_gpu = spec.load_in_8bit or (spec.random_init and on_gpu)
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if on_rank_gpu else "cpu"
    model = build_model(spec.model, overrides=spec.model_overrides, random_init=spec.random_init,
                        trust_remote_code=spec.trust_remote_code, dtype=dtype, device=device, seed=spec.seed,
                        load_in_8bit=spec.load_in_8bit)
    inject(model, spec.adapter)
    counts = count_parameters(model)
    trainer = Trainer(model, tokenizer.pad_token_id, data, spec, checkpoint_dir)
    rank0 = trainer.rank == 0
    resumed = trainer.resume()
    if rank0:
        # Paths in the checkout are recorded relative to it: the record reads the same on every machine.
        tracker.log_params(relative_paths({"data_stats": data.stats, "trainable_params": counts.trainable,
                                           "base_params": counts.base}))
        tracker.log_datasets(trial_datasets(spec, data.stats))  # a resumed run's inputs are deduplicated
        tracker.set_tags({"adaptune.adapter": spec.adapter.short_name(), "adaptune.resumed": str(resumed)})
        if trainer.skipped:
            skipped = "; ".join(f"{p.name}: {why}" for p, why in trainer.skipped)
            tracker.set_tags({"adaptune.skipped_checkpoints": skipped})

    def on_report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        if rank0:
            tracker.log_metrics(metrics, step=int(metrics["step"]))
        if report is not None:
            report(metrics, checkpoint)

    outcome = trainer.train(on_report, should_stop)
    if outcome.cancelled:
        if rank0:
            tracker.finish(TrialStatus.CANCELLED)
        return TrialResult(TrialStatus.CANCELLED, {"step": outcome.global_step})

    out = checkpoint_dir / "result"
    model = trainer.engine.module
    metrics: dict[str, float] = {
        "final_train_loss": outcome.final_loss,
        "trainable_params": counts.trainable,
        "base_params": counts.base,
        "trainable_percent": counts.percent,
        "tokens_trained": outcome.tokens,
        "train_seconds": outcome.seconds,
        "train_tokens_per_s": outcome.tokens / max(outcome.seconds, 1e-9),
        "peak_memory_gb": outcome.peak_memory_bytes / 2**30,
        ("gpu_hours" if on_gpu else "cpu_hours"): outcome.seconds * trainer.world / 3600,
    }
    if outcome.val_loss is not None:
        metrics["val_loss"] = outcome.val_loss
    with trainer.gathered_adapter():
        # ZeRO-3 keeps parameters partitioned: every rank takes part in evaluation then.
        if spec.data.eval and (rank0 or spec.train.zero_stage == 3):
            result = evaluate(model, tokenizer, spec.data.eval, spec.eval, root=data_root(spec.data.data_root),
                              out_dir=out / "predictions" if rank0 else None, template=spec.data.template)
            metrics.update(result.metrics())
            metrics["eval_seconds"] = result.seconds
            metrics["eval_tokens_per_s"] = result.generated_tokens / max(result.seconds, 1e-9)
        if rank0:
            deployed = finalize(model, spec.adapter)
            save_adapter(model, deployed, out / "adapter", base_model=repo_relative(spec.model),
                         trained_as=spec.adapter if deployed != spec.adapter else None)
    if not rank0:
        if report is not None:  # every rank reports the same steps (Ray Train synchronises on them)
            report({**metrics, "step": outcome.global_step, "total_steps": outcome.total_steps}, None)
        return TrialResult(TrialStatus.SUCCEEDED, metrics)
    (out / "summary.json").write_text(json.dumps(
        {"trial_id": trial_id(spec), "adapter": spec.adapter.short_name(), "metrics": metrics,
         "data": relative_paths(data.stats), "provenance": info, "losses": outcome.losses}, indent=2) + "\n")
    (out / "spec.yaml").write_text(yaml.safe_dump(relative_paths(redact(spec.model_dump(mode="json"))),
                                                  sort_keys=False))
    tracker.log_metrics(metrics, step=outcome.global_step)
    tracker.log_artifact(out / "adapter", "adapter")
    if (out / "predictions").is_dir():
        tracker.log_artifact(out / "predictions", "predictions")
    tracker.log_artifact(out / "summary.json")
    tracker.log_artifact(out / "spec.yaml")
    tracker.finish(TrialStatus.SUCCEEDED)
    if report is not None:
        # Last: a scheduler may end the trial's process as soon as it has the final result.
        report({**metrics, "step": outcome.global_step, "total_steps": outcome.total_steps}, None)
    return TrialResult(TrialStatus.SUCCEEDED, metrics, adapter_dir=out / "adapter")
