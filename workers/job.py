"""One trial: fine-tune with DeepSpeed, evaluate, save, record. A plain function, no Ray needed.

    run_trial(spec, tracker, checkpoint_dir) -> TrialResult

Given a `checkpoint_dir` that holds a checkpoint of the same spec, the trial resumes from it.

The trial runs in phases, each a function with one job, as a torchtune recipe does: `build` (tokenizer,
data, model, adapter, trainer, resume), `record_inputs`, `train`, `evaluate_trained` and the adapter's
finalizing and saving (`Record.save_adapter`), then `record_result`. Rank is asked in one place: the
`Record` the phases write to keeps nothing on ranks other than 0.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.adapters.registry import ParamCounts, count_parameters, inject
from workers.compile import uncompile_decoder_layers
from workers.data import TrainData, build_train_data
from workers.errors import ConfigError
from workers.evaluate import evaluate
from workers.model_loading import build_model, eight_bit_config, load_tokenizer
from workers.names import (
    ADAPTER_ARTIFACT,
    ADAPTER_TAG,
    BASE_PARAMS,
    CPU_HOURS,
    ERROR_TAG,
    FINAL_TRAIN_LOSS,
    GPU_HOURS,
    PEAK_MEMORY_GB,
    PREDICTIONS_ARTIFACT,
    RESUMED_TAG,
    SKIPPED_CHECKPOINTS_TAG,
    SPEC_ARTIFACT,
    SUMMARY_FILE,
    TOKENS_TRAINED,
    TRAIN_SECONDS,
    TRAINABLE_PARAMS,
    VAL_LOSS,
)
from workers.placement import family_for
from workers.provenance import provenance
from workers.record import Record
from workers.redaction import redact
from workers.repo_paths import relative_paths
from workers.results import Report, TrainOutcome, TrialResult, TrialStatus
from workers.run_inputs import trial_datasets
from workers.spec import RESUMABLE_CHANGES, TrialSpec, trial_id
from workers.tasks import data_root
from workers.tracking import Tracker
from workers.train import Trainer, rank_device, reset_peak_memory, resolve_precision, seed_everything


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


# What torch's CPU allocator says when the host has no memory left (it raises a plain RuntimeError).
_CPU_OOM = "DefaultCPUAllocator: can't allocate memory"


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is a device or host allocation that did not fit."""
    return isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, RuntimeError) and _CPU_OOM in str(exc))


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
    gpu_share: float = 1.0,
) -> TrialResult:
    """Fine-tune, evaluate and record one trial; resume from `checkpoint_dir` when it holds a checkpoint.

    `gpu_share`: the part of its GPU each rank holds (a sweep's `gpus_per_trial`), for its GPU hours.

    The spec's parameters are logged first, before anything that can fail, so every run can be told
    apart by them. User errors (`ConfigError`) propagate after the run is marked failed; running out of
    memory (a GPU's or the host's) is reported as OOM with the memory figures and is not retried.
    """
    checkpoint_dir = Path(checkpoint_dir)
    info = provenance()
    tracker.log_params(relative_paths({**spec.model_dump(mode="json"), "provenance": info}))
    try:
        check_resumable(spec, checkpoint_dir)
        return _run(spec, tracker, checkpoint_dir, info, report, should_stop, gpu_share)
    except KeyboardInterrupt:
        tracker.finish(TrialStatus.CANCELLED)
        return TrialResult(TrialStatus.CANCELLED, {}, error="interrupted")
    except ConfigError as exc:
        tracker.set_tags({ERROR_TAG: str(exc)[:5000]})
        tracker.finish(TrialStatus.FAILED)
        raise
    except Exception as exc:
        if out_of_memory(exc):
            error = f"out of memory: {str(exc).splitlines()[0]} ({_memory_figures()})"
            tracker.set_tags({ERROR_TAG: error[:5000]})
            tracker.finish(TrialStatus.OOM)
            return TrialResult(TrialStatus.OOM, {}, error=error)
        error = "".join(traceback.format_exception(exc))
        tracker.set_tags({ERROR_TAG: error[-5000:]})
        tracker.finish(TrialStatus.FAILED)
        return TrialResult(TrialStatus.FAILED, {}, error=one_line(exc))


def _run(
    spec: TrialSpec, tracker: Tracker, checkpoint_dir: Path, info: dict[str, str], report: Report | None,
    should_stop: Callable[[], bool] | None, gpu_share: float,
) -> TrialResult:
    """The trial's phases, in order; a cancelled run stops after training."""
    trial = build(spec, checkpoint_dir)
    record = Record(tracker, trial.trainer.rank, checkpoint_dir / "result")
    record_inputs(record, spec, trial)
    outcome = train(trial, record, report, should_stop)
    if outcome.cancelled:
        record.finish(TrialStatus.CANCELLED)
        return TrialResult(TrialStatus.CANCELLED, {"step": outcome.global_step})
    metrics = train_metrics(trial, outcome, gpu_share)
    with trial.trainer.gathered_adapter():  # ZeRO-3 partitions the adapter: whole in here, on every rank
        metrics.update(evaluate_trained(spec, trial, record))
        record.save_adapter(trial.trainer.engine.module, spec)
    record_result(record, spec, trial, outcome, metrics, info)
    if report is not None:
        # Last: a scheduler may end the trial's process as soon as it has the final result. Every rank
        # reports the same steps (Ray Train synchronises on them).
        report({**metrics, "step": outcome.global_step, "total_steps": outcome.total_steps}, None)
    return TrialResult(TrialStatus.SUCCEEDED, metrics, adapter_dir=record.adapter_dir)


@dataclass
class Built:
    """What `build` makes of a spec, for the later phases."""

    tokenizer: PreTrainedTokenizerBase
    data: TrainData
    trainer: Trainer
    counts: ParamCounts
    resumed: bool


def build(spec: TrialSpec, checkpoint_dir: Path) -> Built:
    """Tokenizer, training data, the model with its adapter injected, and its trainer, resumed from the
    newest valid checkpoint of `checkpoint_dir` where there is one."""
    reset_peak_memory(rank_device())  # the trial's own peak, model included
    dtype = resolve_precision(spec.train.precision, torch.cuda.is_available())
    if spec.load_in_8bit:
        eight_bit_config()  # no GPU or no bitsandbytes: refused before any data work
    tokenizer = load_tokenizer(spec.tokenizer or spec.model, spec.trust_remote_code)
    data = build_train_data(spec.data, tokenizer, spec.seed)
    seed_everything(spec.seed)
    model = load_model(spec, dtype)
    inject(model, spec.adapter)
    counts = count_parameters(model)
    family_for(model.config).check_packing(spec.data.packing)
    trainer = Trainer(model, tokenizer.pad_token_id, data, spec, checkpoint_dir)
    return Built(tokenizer, data, trainer, counts, trainer.resume())


def load_model(spec: TrialSpec, dtype: torch.dtype) -> PreTrainedModel:
    """The base model of `spec` in `dtype`, on the device it is best built on."""
    on_gpu = torch.cuda.is_available()
    # An 8-bit base is quantized as it loads, and a random one initialised, on this rank's GPU (a 7B random
    # init takes minutes on a CPU); any other loads on the CPU and the trainer moves it.
    on_rank_gpu = spec.load_in_8bit or (spec.random_init and on_gpu)
    device = rank_device() if on_rank_gpu else torch.device("cpu")
    return build_model(spec.model, overrides=spec.model_overrides, random_init=spec.random_init,
                       trust_remote_code=spec.trust_remote_code, dtype=dtype, device=device, seed=spec.seed,
                       load_in_8bit=spec.load_in_8bit)


def record_inputs(record: Record, spec: TrialSpec, trial: Built) -> None:
    """What the trial trains: its data and parameter counts, datasets, adapter and whether it resumed."""
    # Paths in the checkout are recorded relative to it: the record reads the same on every machine.
    record.log_params(relative_paths({"data_stats": trial.data.stats, TRAINABLE_PARAMS: trial.counts.trainable,
                                      BASE_PARAMS: trial.counts.base}))
    record.log_datasets(trial_datasets(spec, trial.data.stats))  # a resumed run's inputs are deduplicated
    record.set_tags({ADAPTER_TAG: spec.adapter.short_name(), RESUMED_TAG: str(trial.resumed)})
    if trial.trainer.skipped:
        skipped = "; ".join(f"{p.name}: {why}" for p, why in trial.trainer.skipped)
        record.set_tags({SKIPPED_CHECKPOINTS_TAG: skipped})


def train(trial: Built, record: Record, report: Report | None, should_stop: Callable[[], bool] | None,
          ) -> TrainOutcome:
    """Train, logging each log point's metrics and passing them on to `report`."""

    def on_report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        record.log_metrics(metrics, step=int(metrics["step"]))
        if report is not None:
            report(metrics, checkpoint)

    return trial.trainer.train(on_report, should_stop)


def compute_hours(seconds: float, ranks: int, on_gpu: bool, gpu_share: float) -> dict[str, float]:
    """The hours of compute a run held: GPU hours = seconds · ranks · the GPU share of each / 3600 (four trials
    sharing a GPU for an hour hold one GPU hour between them); on CPUs, worker hours as CPU hours."""
    if on_gpu:
        return {GPU_HOURS: seconds * ranks * gpu_share / 3600}
    return {CPU_HOURS: seconds * ranks / 3600}


def train_metrics(trial: Built, outcome: TrainOutcome, gpu_share: float) -> dict[str, float]:
    """The trial's final training figures: loss, sizes, throughput, memory and compute."""
    counts = trial.counts
    metrics: dict[str, float] = {
        FINAL_TRAIN_LOSS: outcome.final_loss,
        TRAINABLE_PARAMS: counts.trainable,
        BASE_PARAMS: counts.base,
        "trainable_percent": counts.percent,
        TOKENS_TRAINED: outcome.tokens,
        TRAIN_SECONDS: outcome.seconds,
        "train_tokens_per_s": outcome.tokens / max(outcome.seconds, 1e-9),
        PEAK_MEMORY_GB: outcome.peak_memory_bytes / 2**30,
        **compute_hours(outcome.seconds, trial.trainer.world, torch.cuda.is_available(), gpu_share),
    }
    if outcome.val_loss is not None:
        metrics[VAL_LOSS] = outcome.val_loss
    return metrics


def evaluate_trained(spec: TrialSpec, trial: Built, record: Record) -> dict[str, float]:
    """Accuracy on the eval sets and the evaluation's speed, where this rank evaluates (else nothing);
    rank 0 keeps the predictions."""
    if not record.evaluates(spec):
        return {}
    uncompile_decoder_layers(trial.trainer.engine.module)  # the evaluation compiles its own way
    # Under ZeRO-3 every rank evaluates (each forward gathers the parameters from all): in step, with several.
    result = evaluate(trial.trainer.engine.module, trial.tokenizer, spec.data.eval, spec.eval,
                      root=data_root(spec.data.data_root), out_dir=record.predictions_dir,
                      template=spec.data.template, synced=spec.train.zero_stage == 3 and trial.trainer.world > 1)
    return {**result.metrics(), "eval_seconds": result.seconds,
            "eval_tokens_per_s": result.generated_tokens / max(result.seconds, 1e-9)}


def record_result(record: Record, spec: TrialSpec, trial: Built, outcome: TrainOutcome, metrics: dict[str, float],
                  info: dict[str, str]) -> None:
    """summary.json and spec.yaml beside the adapter; the final metrics and the result folder to the
    tracker; the run finished."""
    out = record.out
    record.write_text(SUMMARY_FILE, json.dumps(
        {"trial_id": trial_id(spec), "adapter": spec.adapter.short_name(), "metrics": metrics,
         "data": relative_paths(trial.data.stats), "provenance": info, "losses": outcome.losses}, indent=2) + "\n")
    record.write_text(SPEC_ARTIFACT, yaml.safe_dump(relative_paths(redact(spec.model_dump(mode="json"))),
                                                    sort_keys=False))
    record.log_metrics(metrics, step=outcome.global_step)
    record.log_artifact(out / ADAPTER_ARTIFACT, ADAPTER_ARTIFACT)
    if (out / PREDICTIONS_ARTIFACT).is_dir():
        record.log_artifact(out / PREDICTIONS_ARTIFACT, PREDICTIONS_ARTIFACT)
    record.log_artifact(out / SUMMARY_FILE)
    record.log_artifact(out / SPEC_ARTIFACT)
    record.finish(TrialStatus.SUCCEEDED)
