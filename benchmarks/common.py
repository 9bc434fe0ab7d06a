"""Helpers shared by the benchmarks: naming the machine, timing, memory, read bandwidth.

Results go to benchmarks/results/<machine-slug>/, where the slug is made from the CPU model
(or the GPU name when the benchmark runs on CUDA) the same way benchmarks/triton_kernels.py
does, so the kernel and end-to-end tables of one machine sit side by side.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


# ------------------------------------------------------------------------------ the machine


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo ("AMD EPYC", "Intel(R) Xeon(R) ..."), else platform's guess.

    Some VMs report only the family ("AMD EPYC") for generations as different as Zen 3 (AVX2)
    and Zen 4 (AVX-512): a bare "AMD EPYC" without AVX-512 is named "AMD EPYC (AVX2)", so the
    two keep separate results folders (amd-epyc, amd-epyc-avx2)."""
    name, flags = None, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1]
    except OSError:
        pass
    if name == "AMD EPYC" and "avx512f" not in flags.split():
        return "AMD EPYC (AVX2)"
    return name or platform.processor() or platform.machine() or "cpu"


def usable_cores() -> int:
    """CPU cores this process may run on (respects taskset / container CPU sets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def slug(name: str) -> str:
    """'AMD EPYC' -> 'amd-epyc' (the results folder name; same rule as benchmarks/triton_kernels.py)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device) -> str:
    """The GPU name for a CUDA device, else the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def machine_info(device: torch.device, threads: int) -> dict[str, str]:
    """What a results file must say about where its numbers came from."""
    info = {
        "device": device_name(device),
        "cpu": cpu_name(),
        "cores": str(usable_cores()),
        "memory": f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(threads),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    if device.type == "cuda":
        info["cuda"] = str(torch.version.cuda)
    return info


# ------------------------------------------------------------------------------ timing and memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call to fn(), waiting for the GPU to finish on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `repeats` calls to fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, device) for _ in range(max(1, repeats)))


def write_markdown(out_dir: Path | None, info: dict[str, str], name: str, lines: list[str]) -> Path:
    """Write `lines` to <out_dir or benchmarks/results/<machine>>/<name> and say so."""
    out_dir = out_dir or Path(__file__).resolve().parent / "results" / slug(info["cpu"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / name}")
    return out_dir / name


def median_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Median microseconds of a CPU call repeated for `seconds` (at least 5 times), after 3
    untimed calls: for small ops, where one call is far below a timer's resolution of noise."""
    for _ in range(3):
        fn()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux this is VmHWM from /proc/self/status: the high-water mark of this process's own
    address space. ru_maxrss would be the same number but for one trap: Linux carries it across
    fork + exec, so a child started by a parent that once held 1 GiB reports at least 1 GiB.
    Elsewhere ru_maxrss is the fallback (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have spent busy since boot (from /proc/stat),
    or None where that file does not exist. The difference over an interval, minus what our own
    process used, is what *other* processes took from the cores meanwhile: a measure of noise."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is inside user


def others_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all cores busy over the next `seconds` while this process sleeps (so: other
    processes' load), or None where /proc/stat is unavailable."""
    before = cpu_busy_seconds()
    time.sleep(seconds)
    after = cpu_busy_seconds()
    if before is None or after is None:
        return None
    return max(0.0, after - before) / (seconds * usable_cores())


def wait_for_quiet_machine(max_wait_s: float, threshold: float = 0.15, log=print) -> float | None:
    """Wait (up to `max_wait_s`) until other processes use less than `threshold` of the cores,
    checking every second; returns the last busy fraction seen. On a shared machine a neighbour's
    work oversubscribes the cores, and OpenMP-threaded torch can slow down by 10x and more then."""
    deadline = time.monotonic() + max_wait_s
    busy = others_busy_fraction()
    announced = False
    while busy is not None and busy >= threshold and time.monotonic() < deadline:
        if not announced:
            log(f"  waiting for a quiet machine: other processes use {100 * busy:.0f}% of the cores "
                f"(up to {max_wait_s:.0f} s) ...")
            announced = True
        busy = others_busy_fraction()
    if busy is not None and busy >= threshold and max_wait_s > 0:
        log(f"  machine still busy ({100 * busy:.0f}% used by others); measuring anyway, results will be noisy")
    return busy


def measure_read_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 7) -> float:
    """Achievable memory read bandwidth in GB/s (1e9 bytes/s): median time of `tensor.sum()` over
    a `gib` GiB float32 tensor, with torch's current thread count. A sum reads every byte once and
    writes nothing, which is what a weight-bound decode step does too. On CPU the tensor is far
    larger than any cache, so this is DRAM bandwidth as torch can reach it from these threads."""
    numel = int(gib * 2**30) // 4
    data = torch.ones(numel, dtype=torch.float32, device=device)  # written once: pages are resident
    seconds = median_seconds(lambda: data.sum(), device, repeats=repeats, warmup=2)
    del data
    return numel * 4 / seconds / 1e9
