"""What a sweep report is made of: trials, their configurations, means over seeds, the Pareto front.

Read by both `orchestrator.report`, which computes a `Summary` and writes it out, and
`orchestrator.report_plots`, which draws it: neither imports the other's half.
"""

from __future__ import annotations

import ast
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.comparison import Comparison
from workers.names import TRAINABLE_PARAMS
from workers.spec import TrialSpec

SUCCEEDED = ("SUCCEEDED", "FINISHED")
# Params that identify a configuration: the spec's fields, less what repeats a configuration.
_CONFIG_FIELDS = set(TrialSpec.model_fields) - {"name", "seed"}


@dataclass(frozen=True)
class Interval:
    """A mean over `n` runs and its 95% interval (NaN bounds for a single run)."""

    mean: float
    low: float
    high: float
    n: int


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """mean ± t((1 + confidence) / 2, n - 1) · s / √n."""
    from scipy.stats import t

    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, score) points no other point beats: no lower-or-equal cost with a higher
    score, or lower cost with an equal one. Ordered by cost."""
    front = []
    for i, (cost, score) in enumerate(points):
        dominated = any(
            (c <= cost and s >= score) and (c < cost or s > score) for j, (c, s) in enumerate(points) if j != i
        )
        if not dominated and not any(points[k] == (cost, score) for k in front):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


@dataclass
class Trial:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    adapter: str

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCEEDED

    def config_key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((k, v) for k, v in self.params.items() if k.split(".", 1)[0] in _CONFIG_FIELDS))


def _placement(text: str | None) -> str:
    if not text:
        return "every layer"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return "+".join(value) if isinstance(value, list) else str(value)


@dataclass
class Configuration:
    """The trials of one point of the space, its seeds aside."""

    label: str
    trials: list[Trial]
    stats: dict[str, Interval] = field(default_factory=dict)

    @property
    def params(self) -> dict[str, str]:
        return self.trials[0].params

    @property
    def method(self) -> str:
        return self.params.get("adapter.type", "?")

    @property
    def placement(self) -> str:
        return _placement(self.params.get("adapter.placement"))

    def number(self, key: str) -> float | None:
        value = self.params.get(key)
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    @property
    def trainable_params(self) -> float | None:
        return self.number(TRAINABLE_PARAMS)

    @property
    def seeds(self) -> list[str]:
        return [t.params.get("seed", "?") for t in self.trials]


@dataclass
class Summary:
    """Everything the report shows, computed once from the store."""

    metric: str
    mode: str
    configurations: list[Configuration]
    trials: list[Trial]
    costs: dict[str, float]
    curves: dict[str, dict[str, list[tuple[int, float]]]]
    bootstrap: Comparison | None = None
    ranked: list[Configuration] = field(default_factory=list)
    compared: list[Configuration] = field(default_factory=list)  # (best, runner-up) as chosen
    chosen_on: str = ""  # "validation loss" or "the test sets"
    note: str = ""

