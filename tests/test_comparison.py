"""Best vs runner-up with training seeds counted: known answers on synthetic tables.

The tables have three seeds whose macro gaps are +0.20, +0.15 and -0.05 (mean +0.10). With the gap
constant within each seed, the two-level bootstrap is the bootstrap of three numbers: 27 equally
likely resamples, the lowest (all -0.05) and the highest (all +0.20) each 1/27 = 3.7% > 2.5%, so the
95% interval is exactly [-0.05, +0.20] and P(Δ* ≤ 0) = 1/27. The seed-paired t-test:
sd = √(((0.1)² + (0.05)² + (0.15)²) / 2) = √0.0175, t = 0.1 / (√0.0175 / √3) = 1.3093, 2 degrees of freedom.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from orchestrator.comparison import seed_paired_t, two_level_bootstrap
from orchestrator.report import Trial, collect, verdict

GAPS = (0.20, 0.15, -0.05)
T_KNOWN = 0.1 / (math.sqrt(0.0175) / math.sqrt(3))


def _binary_table() -> tuple[np.ndarray, np.ndarray]:
    """3 seeds x 100 questions of 0/1: B gets the first 50 right in every seed; A gets 20, 15 more,
    and 5 fewer: the same per-seed gaps as `GAPS`."""
    b = np.zeros((3, 100))
    b[:, :50] = 1
    a = b.copy()
    a[0, 50:70] = 1
    a[1, 50:65] = 1
    a[2, 45:50] = 0
    return a, b


def test_constant_gaps_give_the_exact_bootstrap_of_three_seeds() -> None:
    b = np.full((3, 50), 0.5)
    a = b + np.array(GAPS)[:, None]
    result = two_level_bootstrap({"t": a}, {"t": b}, resamples=20_000)
    assert result.delta == pytest.approx(0.10)
    assert (result.low, result.high) == (pytest.approx(-0.05), pytest.approx(0.20))
    assert result.p_value == pytest.approx(1 / 27, abs=0.006)
    assert not result.significant
    assert result.t_statistic == pytest.approx(T_KNOWN, rel=1e-9)
    assert result.t_p_value == pytest.approx(stats.t.sf(T_KNOWN, 2), rel=1e-9)
    assert result.t_p_value == pytest.approx(0.1602, abs=5e-4)
    assert (result.seeds, result.questions) == (3, 50)


def test_question_resampling_alone_calls_certain_what_seeds_undo() -> None:
    a, b = _binary_table()
    # The old report's statistic: questions resampled, each averaged over seeds.
    questions_only = two_level_bootstrap({"t": a.mean(axis=0)}, {"t": b.mean(axis=0)}, resamples=4000)
    assert questions_only.delta == pytest.approx(0.10)
    assert questions_only.significant and questions_only.p_value < 0.01
    both = two_level_bootstrap({"t": a}, {"t": b}, resamples=4000)
    assert both.delta == pytest.approx(0.10)
    assert both.low < 0 < both.high and not both.significant
    assert both.p_value > 0.025
    assert both.t_statistic == pytest.approx(T_KNOWN)
    paired = stats.ttest_rel(a.mean(axis=1), b.mean(axis=1), alternative="greater")
    assert both.t_p_value == pytest.approx(paired.pvalue)


def test_a_gap_every_seed_agrees_on_is_certain() -> None:
    a, b = _binary_table()
    a[2] = b[2]
    a[2, 50:60] = 1  # the third seed now gains 10 questions too
    result = two_level_bootstrap({"t": a, "u": a}, {"t": b, "u": b}, resamples=4000)
    assert result.delta == pytest.approx(0.15)
    assert result.significant and result.low > 0.05
    assert result.t_p_value < 0.05


def test_identical_configurations_and_one_seed() -> None:
    a, _ = _binary_table()
    same = two_level_bootstrap({"t": a}, {"t": a}, resamples=500)
    assert (same.delta, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    one = two_level_bootstrap({"t": a[0]}, {"t": a[2]}, resamples=500)
    assert one.seeds == 1 and one.delta == pytest.approx(0.25)
    assert math.isnan(one.t_statistic) and math.isnan(one.t_p_value)
    assert seed_paired_t({"t": a[:1]}, {"t": a[2:]}) == (pytest.approx(math.nan, nan_ok=True),) * 2
    with pytest.raises(ValueError, match="different tasks"):
        two_level_bootstrap({"t": a}, {"u": a})


class _Table:
    """An in-memory sweep: configuration -> seed -> per-question correctness, with or without val loss."""

    def __init__(self, answers: dict[str, dict[int, np.ndarray]], val_loss: dict[str, float] | None) -> None:
        self.answers, self.val_loss = answers, val_loss

    def trials(self) -> list[Trial]:
        out = []
        for label, seeds in self.answers.items():
            for seed, row in seeds.items():
                metrics = {"accuracy/t": float(row.mean()), "accuracy/macro": float(row.mean())}
                if self.val_loss is not None:
                    metrics["val_loss"] = self.val_loss[label]
                params = {"adapter.type": label, "seed": str(seed)}
                out.append(Trial(f"{label}-{seed}", f"{label}-s{seed}", "FINISHED", params, metrics, label))
        return out

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return []

    def predictions(self, run_id: str, folder: Path) -> Path:
        label, seed = run_id.rsplit("-", 1)
        rows = self.answers[label][int(seed)]
        (folder / "t.jsonl").write_text("".join(json.dumps({"id": i, "correct": bool(c)}) + "\n"
                                                for i, c in enumerate(rows)))
        return folder


def test_the_report_pairs_seeds_and_chooses_on_validation() -> None:
    a, b = _binary_table()
    table = {"lora": dict(enumerate(a, start=1)), "series": dict(enumerate(b, start=1)),
             "prefix": {1: b[0] * 0, 2: b[1] * 0, 3: b[2] * 0}}
    # Validation prefers series over lora: the comparison is series vs lora although lora tests higher.
    summary = collect(_Table(table, {"lora": 1.2, "series": 1.1, "prefix": 2.0}), resamples=2000)
    assert [c.label for c in summary.ranked] == ["lora", "series", "prefix"]
    assert [c.label for c in summary.compared] == ["series", "lora"] and summary.chosen_on == "validation loss"
    assert summary.bootstrap.delta == pytest.approx(-0.10) and summary.bootstrap.seeds == 3
    text = verdict(summary)
    assert text.startswith("series is not distinguishable from the runner-up lora on the same 3 seed(s)")
    assert "chosen on the validation split" in text
    assert f"seed-paired t-test one-sided p = {stats.t.sf(-T_KNOWN, 2):.4f}" in text

    untuned = collect(_Table(table, None), resamples=2000)
    assert [c.label for c in untuned.compared] == ["lora", "series"] and untuned.chosen_on == "the test sets"
    assert "is not distinguishable from" in verdict(untuned)
    assert "chosen on the test sets they are compared on" in verdict(untuned)


def test_the_report_uses_only_the_seeds_both_ran() -> None:
    a, b = _binary_table()
    table = {"lora": {1: a[0], 2: a[1]}, "series": {2: b[1], 3: b[2]}}
    summary = collect(_Table(table, None), resamples=500)
    assert summary.bootstrap.seeds == 1 and summary.bootstrap.delta == pytest.approx(0.15)
    assert "one seed: training-seed variance is not measured" in verdict(summary)
    apart = collect(_Table({"lora": {1: a[0]}, "series": {2: b[1]}}, None), resamples=500)
    assert apart.bootstrap is None and apart.note == "no paired comparison: the configurations share no training seed"
