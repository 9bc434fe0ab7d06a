"""Smoke test of benchmarks/quantize.py (its --quick run: a tiny checkpoint with the benchmark's
weight statistics, one repeat, into a temporary folder), so it keeps working as the code changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quantize_benchmark_quick_run(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.quantize", "--quick", "--parts", "ops,decode,accuracy", "--out", str(out),
         "--weights", str(tmp_path / "weights")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "quantize.md").read_text()
    for section in ("One linear at decode sizes", "Decode, load and memory", "Accuracy against ours fp32"):
        assert section in report
    data = json.loads((out / "quantize.json").read_text())
    assert {"ours fp32", "ours int8 (quantized while loading fp32 files)"} <= set(data["decode"])
    assert set(data["accuracy"]["variants"]) == {"int8", "int4 g32"}
    assert all(0 <= v["top1_agreement"] <= 1 for v in data["accuracy"]["variants"].values())
