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
from collections.abc import Callable, Mapping

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

logger = logging.getLogger(__name__)


class SpooledSystemMetrics(SystemMetricsMonitor):
    """Every `interval_s` seconds (`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides, as for MLflow's
    own), the metrics sampled since the last log, logged through `log`."""

    def __init__(self, log: Callable[[Mapping[str, float], int], None], run_id: str, uri: str, *,
                 interval_s: float, resumed: bool) -> None:
        super().__init__(run_id, sampling_interval=interval_s, resume_logging=resumed, tracking_uri=uri)
        self._log = log

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
