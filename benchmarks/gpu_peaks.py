"""Peak numbers per GPU, used to express a measured rate as a fraction of the hardware's peak.

bandwidth_gbs: DRAM bandwidth from the vendor's datasheet (GB/s = 1e9 bytes/s).
bf16_tflops: dense (no 2:4 sparsity) bf16 tensor-core throughput with fp32 accumulation
(TFLOP/s = 1e12 FLOP/s), from the datasheet. Datasheet peaks are not reachable in practice;
the kernel benchmark also measures a device-to-device copy to give an achievable bandwidth.

Entries are matched against `torch.cuda.get_device_name()` (first matching pattern wins, so
the more specific patterns come first).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuPeak:
    name: str
    bandwidth_gbs: float
    bf16_tflops: float


# (substrings that must all appear in the lower-cased device name, peak)
PEAKS: list[tuple[tuple[str, ...], GpuPeak]] = [
    (("gh200",), GpuPeak("GH200", 4000, 989)),
    (("h200",), GpuPeak("H200 SXM", 4800, 989)),
    (("h100", "nvl"), GpuPeak("H100 NVL", 3900, 835)),
    (("h100", "pcie"), GpuPeak("H100 PCIe", 2000, 756)),
    (("h100",), GpuPeak("H100 SXM", 3350, 989)),
    (("a100", "pcie", "40"), GpuPeak("A100 PCIe 40GB", 1555, 312)),
    (("a100", "pcie"), GpuPeak("A100 PCIe 80GB", 1935, 312)),
    (("a100", "40gb"), GpuPeak("A100 SXM 40GB", 1555, 312)),
    (("a100",), GpuPeak("A100 SXM 80GB", 2039, 312)),
    (("l40s",), GpuPeak("L40S", 864, 362)),
    (("l4",), GpuPeak("L4", 300, 121)),
    (("a10",), GpuPeak("A10", 600, 125)),
    (("rtx", "4090"), GpuPeak("RTX 4090", 1008, 165)),
    (("rtx", "3090"), GpuPeak("RTX 3090", 936, 71)),
]


def lookup(device_name: str) -> GpuPeak | None:
    """The peak entry for a CUDA device name, or None when the GPU is not in the table."""
    lowered = device_name.lower()
    for patterns, peak in PEAKS:
        if all(p in lowered for p in patterns):
            return peak
    return None
