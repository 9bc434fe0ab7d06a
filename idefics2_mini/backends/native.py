"""C kernels of the CPU backends, built once per machine with the system C compiler.

A few decode-time operations stream weights faster from a small C loop than from the matmul
libraries torch calls (backends/gemv.c for bf16 weights, quantize/qmatmul.c for int8/int4). Each
is compiled on first use with `cc -O3 -march=native -fopenmp -shared -fPIC` (falling back to
fewer flags) into the user cache ($IDEFICS2_MINI_CACHE, else $XDG_CACHE_HOME/idefics2_mini, else
~/.cache/idefics2_mini), named by a hash of the source, the compiler, the flags and the CPU, and
loaded with ctypes. The OpenMP runtime is the one torch already loaded (same soname), so the
kernels share torch's threads. Without a working compiler `NativeLibrary.get()` returns None and
says why in `.error`; every caller then runs its torch path (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3", "-march=native"],  # e.g. Apple clang: no OpenMP -> one thread
    ["-O3"],
)


def cache_dir() -> Path:
    if os.environ.get("IDEFICS2_MINI_CACHE"):
        return Path(os.environ["IDEFICS2_MINI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "idefics2_mini"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(compiler: str, flags: list[str], source: Path, target: Path) -> str | None:
    """Compile `source` into `target` (atomically); None on success, else the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        partial = Path(work) / target.name
        command = [compiler, *flags, "-shared", "-fPIC", "-o", str(partial), str(source)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"{' '.join(command)}: {err}"
        if result.returncode != 0:
            return f"{' '.join(command)}: {result.stderr.strip()[-500:]}"
        os.replace(partial, target)
    return None


class NativeLibrary:
    """One C file, built and loaded on the first `get()`.

    `declare(lib)` sets the ctypes signatures of its functions. `switch_env`, when set in the
    environment to "reference", turns the library off (callers take their torch path)."""

    def __init__(self, source: Path, declare: Callable[[ctypes.CDLL], None], switch_env: str | None = None):
        self.source = source
        self.declare = declare
        self.switch_env = switch_env
        self._library: ctypes.CDLL | None = None
        self.error: str | None = None

    def switched_off(self) -> bool:
        return bool(self.switch_env) and os.environ.get(self.switch_env, "auto").strip().lower() == "reference"

    def get(self) -> ctypes.CDLL | None:
        """The loaded library, or None when it cannot be built (then `.error` says why) or is
        switched off."""
        if self.switched_off():
            return None
        if self._library is not None or self.error is not None:
            return self._library
        compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
        if compiler is None:
            self.error = "no C compiler found (set CC, or install gcc or clang)"
            return None
        errors = []
        source = self.source.read_bytes()
        for flags in FLAG_SETS:
            key = hashlib.sha256(source + " ".join([compiler, *flags, _cpu_model()]).encode()).hexdigest()[:16]
            target = cache_dir() / f"{self.source.stem}-{key}.so"
            if not target.is_file():
                error = _compile(compiler, flags, self.source, target)
                if error is not None:
                    errors.append(error)
                    continue
            try:
                lib = ctypes.CDLL(str(target))
                self.declare(lib)
            except (OSError, AttributeError) as err:
                errors.append(f"{target}: {err}")
                continue
            self._library = lib
            return lib
        self.error = "; ".join(errors)
        return None
