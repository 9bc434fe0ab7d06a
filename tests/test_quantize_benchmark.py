"""Smoke test of benchmarks/quantize.py (its --quick run: a tiny checkpoint with the benchmark's
weight statistics, one repeat, into a temporary folder), so it keeps working as the code changes;
and the bytes a decode step reads, as the report counts them."""

from __future__ import annotations

import importlib.util
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
    if importlib.util.find_spec("transformers") is not None:  # its step bytes once crashed the decode part
        reference = data["decode"]["reference fp32 (transformers)"]
        assert reference["decode_b1"]["step_bytes"] == data["decode"]["ours fp32"]["decode_b1"]["step_bytes"]
    assert "## Targets (issue 15, CPU)" in report and data["targets"]
    assert set(data["accuracy"]["variants"]) == {"int8", "int4 g32"}
    assert all(0 <= v["top1_agreement"] <= 1 for v in data["accuracy"]["variants"].values())


def test_step_bytes_of_the_reference_equal_ours_in_fp32():
    """reference_step_bytes counts from our config what step_bytes counts on our fp32 model (the
    same weights, norms, lm_head, embedding rows and KV cache), so their GB/s compare."""
    import idefics2_mini as im
    from benchmarks import quantize as bench

    config = bench.bench_config(quick=True)
    model = im.Idefics2(config)
    for batch, context in ((1, 12.5), (8, 40.0)):
        assert bench.reference_step_bytes(config, batch, context) == bench.step_bytes(model, batch, context)
