"""A trial's system metrics (CPU, memory, disk, network; GPU where `pynvml` finds one), sampled by
MLflow's monitors and logged through the trial's tracker: with a spool, a store outage neither stops
the sampling nor loses a sample.

MLflow's own sampler logs through a client of its own and ends for good at its first failed request
(measured: a trial through a 330 s outage had no `system/*` metric at all). This one logs
`system/<name>` at steps 0, 1, 2, ... (continued on resume) through `log`, the tracker's
`log_metrics`, which spools while the store is away.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from mlflow.system_metrics.metrics.base_metrics_monitor import BaseMetricsMonitor
from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

logger = logging.getLogger(__name__)


def visible_gpu_handles(nvml: Any, visible: str | None) -> list[Any] | None:
    """NVML's handles of the GPUs a process sees, in its CUDA order; None where CUDA_VISIBLE_DEVICES is unset (every
    GPU). NVML numbers the machine's GPUs and ignores that variable; entries are indices or GPU-/MIG- UUIDs, and
    CUDA stops reading at the first it cannot parse."""
    if visible is None:
        return None
    handles = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
        elif entry.startswith(("GPU-", "MIG-")):
            handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
        else:
            break
    return handles


class SpooledSystemMetrics(SystemMetricsMonitor):
    """Every `interval_s` seconds (`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides, as for MLflow's
    own), the metrics sampled since the last log, logged through `log`."""

    def __init__(self, log: Callable[[Mapping[str, float], int], None], run_id: str, uri: str, *,
                 interval_s: float, resumed: bool) -> None:
        super().__init__(run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=uri)
        self._log = log

    def _initialize_gpu_monitor(self) -> BaseMetricsMonitor | None:
        """MLflow's GPU monitor over the trial's own GPUs, `gpu_<i>` its `cuda:<i>` (MLflow's covers every GPU of
        the machine, numbered physically: a trial's `gpu_0` was the machine's first, whoever held it)."""
        monitor = super()._initialize_gpu_monitor()
        if isinstance(monitor, GPUMonitor):
            import pynvml

            handles = visible_gpu_handles(pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if handles is not None:
                if not handles:
                    return None
                monitor.gpu_handles, monitor.num_gpus = handles, len(handles)
        return monitor

    def monitor(self) -> None:
        """Sample, wait, log; until `finish`. Only an error of the tracker itself (an outage past its
        limit, which fails the trial too) ends it early."""
        while True:
            self.collect_metrics()
            if self._shutdown_event.wait(self.sampling_interval):
                return
            try:
                self.publish_metrics(self.aggregate_metrics())
            except Exception as exc:  # the thread's end, said once: the trial itself meets the same error
                logger.warning("system metrics stopped: %s", exc)
                return

    def publish_metrics(self, metrics: Mapping[str, float]) -> None:
        prefix = self._metrics_prefix + (f"{self.node_id}/" if self.node_id else "")
        self._log({prefix + key: value for key, value in metrics.items()}, self._logging_step)
        self._logging_step += 1
        for monitor in self.monitors:
            monitor.clear_metrics()
