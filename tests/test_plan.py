"""`adaptune plan`: parameter counts at full size from config.json alone, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirunner import run_cli

# (hidden d, MLP width f, layers L, fused qkv, base parameters of the meta build)
SHAPES = {
    "llama-7b": (4096, 11008, 32, False, 6_738_415_616),
    "llama-13b": (5120, 13824, 40, False, 13_015_864_320),
    "bloomz-7b1": (4096, 16384, 30, True, 7_069_016_064),
    "gpt-j-6b": (4096, 16384, 28, False, 6_050_882_784),
    "opt-6.7b": (4096, 16384, 32, False, 6_658_473_984),
}

ADAPTERS = {
    "lora": {"type": "lora", "placement": ["q", "k", "v", "up", "down"], "rank": 32, "alpha": 64},
    "series": {"type": "series", "placement": ["down"], "bottleneck": 256},
    "parallel": {"type": "parallel", "placement": ["up", "down"], "bottleneck": 256},
    "prefix": {"type": "prefix", "virtual_tokens": 10},
}


def closed_form(method: str, d: int, f: int, layers: int, fused: bool) -> int:
    """Per-layer counts of the paper's four configurations, times the layers."""
    r, b, n = 32, 256, 10
    per_layer = {
        # LoRA r(in + out) per linear: q, k, v (one fused d -> 3d linear where fused), up, down
        "lora": r * ((d + 3 * d) if fused else 3 * (d + d)) + 2 * r * (d + f),
        "series": 2 * d * b,  # down-projection d -> b and up-projection b -> d on `down`'s output
        "parallel": 2 * b * (d + f),  # up: d -> b -> f, down: f -> b -> d
        "prefix": n * 2 * d,  # keys and values of n virtual tokens
    }[method]
    return layers * per_layer




def write_spec(tmp_path: Path, model: str | Path, adapter: dict) -> Path:
    spec = tmp_path / "trial.yaml"
    spec.write_text(json.dumps({"model": str(model), "adapter": adapter}))
    return spec


PAPER_LLAMA_7B = {
    "lora": 56_098_816,
    "series": 67_108_864,
    "parallel": 247_463_936,
    "prefix": 2_621_440,
}


@pytest.mark.parametrize("method", list(PAPER_LLAMA_7B))
def test_plan_gives_the_papers_llama_7b_counts(method, model_configs, tmp_path, monkeypatch, capsys) -> None:
    spec = write_spec(tmp_path, model_configs / "llama-7b", ADAPTERS[method])
    code, out, err = run_cli(["plan", str(spec), "--json"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["trainable_params"] == PAPER_LLAMA_7B[method]
    assert result["base_params"] == 6_738_415_616
    expected_pct = 100 * PAPER_LLAMA_7B[method] / (6_738_415_616 + PAPER_LLAMA_7B[method])
    assert result["trainable_percent"] == pytest.approx(expected_pct, abs=1e-4)


def test_parallel_share_is_the_papers_3_54_percent(model_configs, tmp_path, monkeypatch, capsys) -> None:
    spec = write_spec(tmp_path, model_configs / "llama-7b", ADAPTERS["parallel"])
    _, out, _ = run_cli(["plan", str(spec), "--json"], monkeypatch, capsys)
    assert round(json.loads(out)["trainable_percent"], 2) == 3.54


def test_series_on_gate_and_up_is_the_papers_count(model_configs, tmp_path, monkeypatch, capsys) -> None:
    adapter = {"type": "series", "placement": ["gate", "up"], "bottleneck": 256}
    spec = write_spec(tmp_path, model_configs / "llama-7b", adapter)
    _, out, _ = run_cli(["plan", str(spec), "--json"], monkeypatch, capsys)
    assert json.loads(out)["trainable_params"] == 134_217_728


@pytest.mark.parametrize("config", list(SHAPES))
@pytest.mark.parametrize("method", list(ADAPTERS))
def test_plan_counts_equal_the_closed_form_on_every_config(
    config, method, model_configs, tmp_path, monkeypatch, capsys
) -> None:
    d, f, layers, fused, base = SHAPES[config]
    spec = write_spec(tmp_path, model_configs / config, ADAPTERS[method])
    code, out, err = run_cli(["plan", str(spec), "--json"], monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["trainable_params"] == closed_form(method, d, f, layers, fused)
    assert result["base_params"] == base


def test_plan_prints_a_readable_table(model_configs, tmp_path, monkeypatch, capsys) -> None:
    spec = write_spec(tmp_path, model_configs / "llama-7b", ADAPTERS["lora"])
    code, out, _ = run_cli(["plan", str(spec)], monkeypatch, capsys)
    assert code == 0
    assert "56,098,816" in out and "6,738,415,616" in out


BAD = [
    ({"type": "dora", "placement": ["q"], "rank": 8}, "adapter", "unknown adapter type"),
    ({"type": "lora", "placement": ["qq"], "rank": 8}, "adapter.placement", "qq"),
    ({"type": "lora", "placement": ["gate"], "rank": 8}, "adapter.placement", "family 'bloom' has no 'gate'"),
    ({"type": "series", "placement": ["down"], "bottleneck": 0}, "adapter.bottleneck", ""),
    ({"type": "lora", "placement": ["q"], "rank": -4}, "adapter.rank", ""),
    ({"type": "lora", "placement": ["q", "k", "v"], "rank": 5000}, "adapter.rank", "exceeds the layer"),
    ({"type": "series", "placement": ["down"], "bottleneck": 64, "rank": 8}, "adapter.rank", ""),
]


@pytest.mark.parametrize(("adapter", "field", "needle"), BAD)
def test_bad_specs_fail_with_one_line_and_exit_2(
    adapter, field, needle, model_configs, tmp_path, monkeypatch, capsys
) -> None:
    spec = write_spec(tmp_path, model_configs / "bloomz-7b1", adapter)
    before = sorted(tmp_path.iterdir())
    code, out, err = run_cli(["plan", str(spec)], monkeypatch, capsys)
    assert code == 2
    assert out == ""
    line = err.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith(f"error: {spec}: {field}"), line
    assert needle in line
    assert sorted(tmp_path.iterdir()) == before


def test_unknown_model_type_and_missing_config_are_errors(tmp_path, monkeypatch, capsys) -> None:
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba2x"}))
    spec = write_spec(tmp_path, folder, ADAPTERS["lora"])
    code, _, err = run_cli(["plan", str(spec)], monkeypatch, capsys)
    assert code == 2 and f"{spec}: model:" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    spec = write_spec(tmp_path, empty, ADAPTERS["lora"])
    code, _, err = run_cli(["plan", str(spec)], monkeypatch, capsys)
    assert code == 2 and "has no config.json" in err and "Traceback" not in err


def test_missing_spec_file_is_an_error(tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["plan", str(tmp_path / "nope.yaml")], monkeypatch, capsys)
    assert code == 2 and "file not found" in err
