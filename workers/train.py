"""Fine-tuning with DeepSpeed: the only module that imports deepspeed (and `safe_checkpoint`, its loader).

One optimizer step = `accumulation` micro-batches on each of `world` data-parallel ranks; the epoch
order comes from `workers.data.micro_batches` (the same on every rank and after a resume) and rank
r takes micro-batches r, r + world, ... Only trainable (adapter) parameters reach the optimizer;
checkpoints exclude the frozen base, and carry the data position and every RNG state, so a resumed
run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from workers import checkpoints
from workers.adapters.base import shares_layer_graphs
from workers.adapters.registry import enable_gradient_checkpointing, extra_loss
from workers.compile import compile_decoder_layers, compile_enabled
from workers.data import TrainData, collate, micro_batches, to_device
from workers.errors import ConfigError
from workers.extension_build import exclusive_build
from workers.loss import causal_lm_loss, lm_loss
from workers.names import PEAK_MEMORY_GB, TRAIN_LOSS, VAL_LOSS
from workers.results import Report, TrainOutcome

if TYPE_CHECKING:
    from workers.spec import TrialSpec


def init_distributed(backend: str) -> tuple[int, int]:
    """(rank, world size) of the process group a launcher (torchrun, Ray Train) set up, else a
    single-process group on an in-memory store: no port, no MASTER_* or WORLD_SIZE to inherit."""
    import deepspeed

    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
    build_comm_op()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def build_comm_op() -> None:
    """Build (or load) the shared-memory comm op DeepSpeed's CPU accelerator JIT-compiles as its backend starts,
    ahead of it and by `exclusive_build`: a build killed before would otherwise leave every later start waiting.
    Other accelerators have no such op."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")  # as deepspeed.comm.torch.build_shm_op
    if builder is not None and builder.is_compatible(verbose=False):
        with exclusive_build(builder.name):
            builder.load(verbose=False)  # DeepSpeed's own call then finds it loaded


def resolve_precision(precision: str, on_gpu: bool) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if precision in ("bf16", "fp16") and not on_gpu:
        raise ConfigError(None, "train.precision", f"{precision} needs a GPU; on a CPU use fp32 or auto")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def accumulation_steps(batch_size: int, micro_batch_size: int, world: int) -> int:
    if batch_size % (micro_batch_size * world):
        raise ConfigError(
            None, "train.batch_size",
            f"{batch_size} is not divisible by micro_batch_size x workers = {micro_batch_size} x {world}",
        )
    return batch_size // (micro_batch_size * world)


def deepspeed_config(spec: TrialSpec, accumulation: int, dtype: torch.dtype) -> dict[str, Any]:
    t = spec.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": {"stage": t.zero_stage},
        # torch's AdamW: DeepSpeed's fused and CPU Adam need compiled ops and give nothing here.
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay,
                                                  "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True}},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def undo_state_allocation_step(optimizer: Any) -> None:
    """Undo the AdamW step DeepSpeed's unfused half-precision optimizer takes as it starts.

    Without ZeRO, in bf16 (the default on a GPU), DeepSpeed wraps AdamW in `FP16_UnfusedOptimizer`, which allocates
    AdamW's state by a step on zero gradients at the optimizer's full learning rate: its float32 master weights take
    one decoupled weight decay (w <- w - lr · wd · w) and AdamW's step count starts at 1, so the bias corrections
    of every later step are one step off (the first real update ~0.74x its size). The masters are copies of the
    model's weights, untouched by that step: they are copied back and the state dropped, for AdamW to make anew
    at the first real step, as in float32 and under ZeRO.
    """
    masters, params = getattr(optimizer, "fp32_groups", None), getattr(optimizer, "fp16_groups", None)
    if masters is None or params is None:
        return
    with torch.no_grad():
        for master_group, param_group in zip(masters, params, strict=True):
            for master, param in zip(master_group, param_group, strict=True):
                master.copy_(param)
                optimizer.optimizer.state.pop(master, None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_device() -> torch.device:
    """This rank's device: its GPU (LOCAL_RANK among the visible ones) where there is one, else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")


# Linux: writing 5 here resets the process's resident-set peak (VmHWM in /proc/self/status) to its current size.
_CLEAR_REFS, _STATUS = Path("/proc/self/clear_refs"), Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    """Count the peak from here: Tune runs trial after trial in one actor process, whose peak so far is the
    earlier trials'."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):  # no /proc (macOS) or a kernel that refuses it: the process's peak
        _CLEAR_REFS.write_text("5")


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory held since `reset_peak_memory`: the GPU's allocated bytes, or the resident set's."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    with contextlib.suppress(OSError):
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class BestAdapter:
    """The adapter of the lowest validation loss so far, on disk beside the checkpoints (a resume keeps it).

    `train.load_best` is the reference's `load_best_model_at_end` (finetune.py, on whenever
    val_set_size > 0): training ends by putting these weights back, and its val_loss is theirs.
    """

    def __init__(self, stem: Path) -> None:
        self.weights, self.meta = stem.with_suffix(".pt"), stem.with_suffix(".json")

    def loss(self) -> float | None:
        return json.loads(self.meta.read_text())["val_loss"] if self.meta.is_file() else None

    def offer(self, trainer: Trainer, val_loss: float) -> None:
        best = self.loss()
        if best is not None and best <= val_loss:
            return
        from workers.adapters.base import adapter_parameters

        state = {n: p.detach().cpu().clone() for n, p in adapter_parameters(trainer.engine.module)}
        if trainer.rank == 0:
            torch.save(state, self.weights)
            tmp = self.meta.with_suffix(".tmp")
            tmp.write_text(json.dumps({"val_loss": val_loss, "step": trainer.global_step}))
            os.replace(tmp, self.meta)
        dist.barrier()

    def restore(self, trainer: Trainer) -> float:
        """Copy the best weights into the adapter; returns their validation loss."""
        from workers.adapters.base import adapter_parameters

        state = torch.load(self.weights, weights_only=True)
        with torch.no_grad():
            for name, param in adapter_parameters(trainer.engine.module):
                param.copy_(state[name])
        return float(self.loss())


@dataclass
class TokenWindow:
    """The tokens trained since the last log point, the positions of their collated micro-batches (padding
    included), and when the window opened."""

    tokens: int = 0
    slots: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, row_tokens: list[int]) -> None:
        """One micro-batch, as the tokens of each of its rows."""
        self.tokens += sum(row_tokens)
        self.slots += len(row_tokens) * max(row_tokens)  # positions of the collated micro-batch


class Trainer:
    """A DeepSpeed engine over an injected model, with the paper's schedule and exact resume."""

    def __init__(
        self, model: PreTrainedModel, pad_id: int, data: TrainData, spec: TrialSpec, checkpoint_dir: Path
    ) -> None:
        self.spec, self.data, self.pad_id, self.checkpoint_dir = spec, data, pad_id, checkpoint_dir
        on_gpu = torch.cuda.is_available()
        self.rank, self.world = init_distributed("nccl" if on_gpu else "gloo")
        self.device = rank_device()
        self.dtype = resolve_precision(spec.train.precision, on_gpu)
        self.accumulation = accumulation_steps(spec.train.batch_size, spec.train.micro_batch_size, self.world)
        self.lengths = list(data.train["length"])
        self.input_ids, self.labels = data.train["input_ids"], data.train["labels"]
        self.steps_per_epoch, self.total_steps = self._schedule()
        self.engine, self.scheduler = self._engine(model, on_gpu)
        self.global_step, self.epoch, self.position, self.tokens = 0, 0, 0, 0
        self.losses: list[tuple[int, float]] = []
        self.last_val_loss: float | None = None
        self.last_checkpoint: Path | None = None
        self.best = BestAdapter(checkpoint_dir / "best-adapter") if spec.train.load_best else None
        self.skipped: list[tuple[Path, str]] = []

    def _schedule(self) -> tuple[int, int]:
        """(optimizer steps per epoch, optimizer steps of the run: `max_steps`, else `epochs` of them)."""
        t = self.spec.train
        per_epoch = self._epoch_order(0)[1]
        if per_epoch == 0:
            raise ConfigError(
                None, "train.batch_size",
                f"{len(self.lengths)} training examples do not fill one batch of {t.batch_size}",
            )
        return per_epoch, t.max_steps or max(1, int(t.epochs * per_epoch))

    def _engine(self, model: PreTrainedModel, on_gpu: bool) -> tuple[Any, Any]:
        """The DeepSpeed engine over `model`'s trainable parameters, and its linear warmup schedule."""
        import deepspeed

        from workers.safe_checkpoint import SafeCheckpointEngine

        t = self.spec.train
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(model, self.spec.adapter)
        if not getattr(model, "is_loaded_in_8bit", False):  # an 8-bit base loads onto its GPU
            model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        warmup, total = t.warmup_steps, self.total_steps
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            model_parameters=params,
            config=deepspeed_config(self.spec, self.accumulation, self.dtype),
            lr_scheduler=lambda opt: get_linear_schedule_with_warmup(opt, warmup, total),
        )
        undo_state_allocation_step(engine.optimizer)
        engine.checkpoint_engine = SafeCheckpointEngine()  # checkpoints load with weights_only=True
        if compile_enabled(t.compile, on_gpu, pays=shares_layer_graphs(engine.module)):
            compile_decoder_layers(engine.module)
        return engine, scheduler

    def _epoch_order(self, epoch: int) -> tuple[list, int]:
        """This rank's micro-batches of `epoch`, and the optimizer steps the epoch holds."""
        t, d = self.spec.train, self.spec.data
        order = micro_batches(self.lengths, t.micro_batch_size, seed=self.spec.seed, epoch=epoch,
                              group_by_length=d.group_by_length, packing=d.packing, cutoff_len=d.cutoff_len)
        steps = len(order) // (self.world * self.accumulation)
        used = order[: steps * self.world * self.accumulation]
        return used[self.rank::self.world], steps

    def _batch(self, rows: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
        examples = [[{"input_ids": self.input_ids[i], "labels": self.labels[i]} for i in row] for row in rows]
        return to_device(collate(examples, self.pad_id), self.device, self.dtype)

    def resume(self) -> bool:
        """Load the newest valid checkpoint of `checkpoint_dir`, if there is one; name those skipped.

        Raises `checkpoints.CheckpointError` when there are checkpoints and none is valid.
        """
        chosen, self.skipped = checkpoints.newest_valid(self.checkpoint_dir)
        for folder, reason in self.skipped:
            print(f"adaptune: skipped checkpoint {folder}: {reason}; resuming from {chosen.name}", file=sys.stderr)
        if chosen is None:
            return False
        _, state = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=chosen.name, load_module_strict=False)
        self.global_step, self.epoch, self.position = state["global_step"], state["epoch"], state["position"]
        self.tokens, self.losses = state["tokens"], [tuple(x) for x in state["losses"]]
        from workers.safe_checkpoint import set_rng_state

        set_rng_state(state["rng"][self.rank])
        return True

    def save(self) -> Path:
        """Write a checkpoint atomically (see `workers.checkpoints`); returns its folder."""
        tag = checkpoints.tag(self.global_step)
        tmp = checkpoints.TMP_PREFIX + tag
        rng = [None] * self.world
        from workers.safe_checkpoint import rng_state

        dist.all_gather_object(rng, rng_state())
        state = {"global_step": self.global_step, "epoch": self.epoch, "position": self.position,
                 "tokens": self.tokens, "losses": self.losses, "rng": rng}
        self.engine.save_checkpoint(str(self.checkpoint_dir), tag=tmp, client_state=state,
                                    exclude_frozen_parameters=True, save_latest=False)
        dist.barrier()  # every rank's files are written before rank 0 seals the folder
        if self.rank == 0:
            checkpoints.commit(self.checkpoint_dir / tmp, self.checkpoint_dir / tag)
            checkpoints.prune(self.checkpoint_dir, self.spec.train.keep_checkpoints)
        dist.barrier()
        return self.checkpoint_dir / tag

    def _sum_over_ranks(self, *values: float) -> list[float]:
        # On the training device: NCCL, the GPU's backend, reduces no CPU tensor ("No backend type associated
        # with device type cpu"), and the group is NCCL's on a GPU even for one rank.
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _mean_over_ranks(self, total: float, count: float) -> float:
        summed, n = self._sum_over_ranks(total, count)
        return summed / n

    @torch.no_grad()
    def validation_loss(self) -> float | None:
        val = self.data.val
        if val is None or len(val) == 0:
            return None
        self.engine.eval()
        micro = self.spec.train.micro_batch_size
        rows = list(range(len(val)))[self.rank::self.world]
        # Every rank runs as many forwards as the rank with the most rows: under ZeRO-3 each forward gathers the
        # parameters from all ranks, and a rank that stopped a forward early left the others waiting for good.
        # A rank out of rows runs its first one again and counts it nothing.
        forwards = -(-len(range(0, len(val), self.world)) // micro)
        total = count = 0.0
        ids, labels = val["input_ids"], val["labels"]
        for start in range(0, forwards * micro, micro):
            chunk = rows[start:start + micro]
            examples = [[{"input_ids": ids[r], "labels": labels[r]}] for r in chunk or rows[:1] or [0]]
            batch = to_device(collate(examples, self.pad_id), self.device, self.dtype)
            loss = float(lm_loss(self.engine, batch))
            total += loss * len(chunk)
            count += len(chunk)
        self.engine.train()
        return self._mean_over_ranks(total, count)

    def gathered_adapter(self) -> contextlib.AbstractContextManager:
        """A context in which the adapter's parameters are whole on every rank (ZeRO-3 partitions them)."""
        if self.spec.train.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        from workers.adapters.base import adapter_parameters

        return deepspeed.zero.GatheredParameters([p for _, p in adapter_parameters(self.engine.module)])

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L = L_LM + the adapter method's extra loss (`AdapterMethod.extra_loss`), when it has one."""
        # The chunked loss reads the LM head's weight outside its forward: ZeRO-3 holds only a shard there.
        if self.spec.train.zero_stage == 3:
            loss = lm_loss(self.engine, batch)
        else:
            loss = causal_lm_loss(self.engine, self.engine.module, batch)
        extra = extra_loss(self.engine.module, batch, self.spec.adapter)
        return loss if extra is None else loss + extra

    def train(self, report: Report | None = None, should_stop: Callable[[], bool] | None = None) -> TrainOutcome:
        """Train to `total_steps` from where the trainer stands; stop early, with a checkpoint, once
        `should_stop()` says so (the outcome is then `cancelled`)."""
        started = time.perf_counter()
        self.window = TokenWindow()
        self.step_loss, self.step_micro = 0.0, 0
        self.engine.train()
        cancelled = False
        while self.global_step < self.total_steps and not cancelled:
            cancelled = self._train_epoch(report, should_stop)
        self.tokens += int(self._sum_over_ranks(self.window.tokens)[0])
        if self.best is not None and not cancelled and self.best.loss() is not None:
            self.last_val_loss = self.best.restore(self)
        return TrainOutcome(
            global_step=self.global_step, total_steps=self.total_steps,
            final_loss=self.losses[-1][1] if self.losses else float("nan"), tokens=self.tokens,
            seconds=time.perf_counter() - started, peak_memory_bytes=peak_memory_bytes(self.device),
            cancelled=cancelled, losses=list(self.losses), val_loss=self.last_val_loss,
        )

    def _train_epoch(self, report: Report | None, should_stop: Callable[[], bool] | None) -> bool:
        """This rank's micro-batches of the current epoch from `position` on, until the epoch or the run
        ends or `should_stop()` says so; whether it did."""
        mine, _ = self._epoch_order(self.epoch)
        stopped = False
        while not stopped and self.position < len(mine) and self.global_step < self.total_steps:
            self._micro_step(mine[self.position])
            stopped = self.position % self.accumulation == 0 and self._optimizer_step(report, should_stop)
        if self.position >= len(mine):
            self.epoch, self.position = self.epoch + 1, 0
        return stopped

    def _micro_step(self, rows: list[tuple[int, ...]]) -> None:
        """Forward and backward over one micro-batch; DeepSpeed steps the optimizer every `accumulation`."""
        loss = self._loss(self._batch(rows))
        self.engine.backward(loss)
        self.engine.step()
        self.position += 1
        self.step_loss += loss.detach().item()
        self.step_micro += 1
        self.window.add([sum(self.lengths[i] for i in row) for row in rows])

    def _optimizer_step(self, report: Report | None, should_stop: Callable[[], bool] | None) -> bool:
        """Book the optimizer step just taken: its loss, its log and validation metrics, its checkpoint;
        whether `should_stop()` said to stop."""
        self.global_step += 1
        # One all-reduce for the step's loss over the ranks and for whether any rank was told to stop:
        # they stop together, at the same step, or the others would wait for it in the next collective.
        told = should_stop is not None and should_stop()
        loss_sum, micro_sum, told_sum = self._sum_over_ranks(self.step_loss, self.step_micro, float(told))
        mean_loss, stop = loss_sum / micro_sum, told_sum > 0
        self.step_loss, self.step_micro = 0.0, 0
        self.losses.append((self.global_step, mean_loss))
        metrics = {**self._window_metrics(mean_loss), **self._validation_metrics()}
        # Metrics go out before the checkpoint that covers their step: a crash between the
        # two replays the step on resume instead of losing its record.
        if metrics and report is not None:
            metrics.update(step=self.global_step, total_steps=self.total_steps, epoch=self.epoch)
            report(metrics, self.last_checkpoint)
        if self.global_step % self.spec.train.save_every == 0 or stop:
            self.last_checkpoint = self.save()
        return stop

    def _window_metrics(self, mean_loss: float) -> dict[str, float]:
        """At a log point (every `log_every` steps and the last): the step's loss, the learning rate and
        the token window's throughput and padding, summed over ranks; the window closes."""
        if not (self.global_step % self.spec.train.log_every == 0 or self.global_step == self.total_steps):
            return {}
        tokens, slots = self._sum_over_ranks(self.window.tokens, self.window.slots)
        elapsed = time.perf_counter() - self.window.start
        self.tokens += int(tokens)
        metrics = {TRAIN_LOSS: mean_loss, "lr": self.scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens / max(elapsed, 1e-9), "padding_share": 1.0 - tokens / slots,
                   PEAK_MEMORY_GB: peak_memory_bytes(self.device) / 2**30}
        self.window = TokenWindow()
        return metrics

    def _validation_metrics(self) -> dict[str, float]:
        """At a validation point (every `eval_every` steps): the validation loss, offered as the best adapter."""
        if self.global_step % self.spec.train.eval_every:
            return {}
        val = self.validation_loss()
        if val is None:
            return {}
        self.last_val_loss = val
        if self.best is not None:
            self.best.offer(self, val)
        return {VAL_LOSS: val}
