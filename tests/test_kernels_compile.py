"""The Triton kernels compile for an H100 (sm_90), on this CPU-only machine: see
tests/aot_compile_kernels.py. The interpreter tests check the math; this checks the compiler."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _ptxas_shipped() -> bool:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas").is_file()


@pytest.mark.skipif(not _ptxas_shipped(), reason="needs triton with its bundled ptxas")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    process = subprocess.run([sys.executable, str(HERE / "aot_compile_kernels.py")], env=env,
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    lines = [line for line in process.stdout.splitlines() if line.startswith("ok ")]
    assert len(lines) == 16, process.stdout
