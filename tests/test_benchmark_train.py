"""Smoke test of benchmarks/train.py (`python -m benchmarks.train`): the tiny model, LoRA, both
implementations, one step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_train_benchmark_runs_both_implementations(tmp_path):
    pytest.importorskip("peft")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.train", "--model", "tiny", "--setups", "lora",
         "--steps", "1", "--threads", "1", "--weights-dir", str(tmp_path / "weights"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "train-tiny.json").read_text())["results"]["lora"]
    assert set(results) == {"ours", "reference"}
    for result in results.values():
        assert "error" not in result, result
        assert result["step_s"] > 0 and result["peak_rss_mib"] > 0
    # Same data, same weights, same loss: the two implementations compute the same step.
    assert abs(results["ours"]["loss"] - results["reference"]["loss"]) <= 1e-5 * results["reference"]["loss"]
    assert "| lora |" in (tmp_path / "train-tiny.md").read_text()
