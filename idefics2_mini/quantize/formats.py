"""What a quantization is (QuantSpec) and the math that makes one: float weight -> (q, s, z).

The stored format and the dequantization are defined in kernels/dequant_matmul.py (its module
docstring; `dequantize_reference`): W[n, k] ≈ q[n, k] * s[n, g] + z[n, g] for output row n and
input group g, z = 0 when symmetric. How the integers are chosen, per group of a row:

    int8, symmetric (default)   s = absmax / 127              q = round(w / s)            in [-127, 127]
    int8, asymmetric            s = (max - min) / 255         z = min + 128 s             q in [-128, 127]
    int4, symmetric             s = absmax / 7                q = round(w / s)            in [-7, 7]
    int4, asymmetric (default)  s = (max - min) / 15          z = min + 8 s               q in [-8, 7]

with q = clamp(round((w - z) / s)), computed from s and z *as stored* (rounded to their storage
dtype first: fp32 for int8, bf16 for int4), so the stored triple is the nearest grid point for
what the kernels will actually multiply. A group with s = 0 (all equal) gets s = 1.
int8 is per output channel (one group = one row); int4 groups are 32, 64 or 128 columns.

The lm_head of an int4 model is int8 by default (`lm_head_bits`), as GPTQ/AWQ tools and
llama.cpp's Q4_K_M keep the output layer finer: its error lands on the logits with nothing after
it to average it out. On the two trained LMs of benchmarks/quantize.py (part `trained`) int4
g64's top-1 agreement with fp32 is 95.0% / 95.2% with an int4 lm_head and 98.2% / 97.9% with an
int8 one. For the 8B it costs 57 MB more (131 MB instead of 74) on the ~4 GB a decode step
reads. `lm_head_bits=4` quantizes it like the rest (gpt-fast's choice).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from kernels.dequant_matmul import BITS, unpack_int4  # noqa: F401  (unpack_int4: re-exported)

INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 64
FORMAT = "idefics2_mini.weight_only"
FORMAT_VERSION = 2  # 2: `lm_head_bits` (version 1 blocks, without it, quantized the lm_head with `bits`)

# Which linears a spec quantizes, by component (our module names). The vision tower is
# optional: its linears are small (1152 wide) and run on many rows (the image's patches), so
# they are neither the bytes that bound decode nor cheap to quantize in accuracy.
COMPONENTS: dict[str, str] = {
    "text": r"text\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "connector": r"connector\..*_proj",
    "lm_head": r"lm_head",
    "vision": r"vision\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))",
}
DEFAULT_COMPONENTS = ("text", "connector", "lm_head")


class QuantizationError(ValueError):
    """A quantization that cannot be made or loaded as asked (bits, group size, files)."""


@dataclass(frozen=True)
class QuantSpec:
    """bits 8 (per output channel) or 4 (groups of `group_size` input columns); symmetric or
    not (default: int8 symmetric, int4 asymmetric, as gpt-fast); `components`: keys of COMPONENTS;
    `lm_head_bits`: the lm_head's width when it is quantized (default 8: module docstring). An
    lm_head of other bits than the rest takes that width's defaults (int8: per channel, symmetric)."""

    bits: int
    group_size: int | None = None  # int4 only; None -> DEFAULT_INT4_GROUP_SIZE
    symmetric: bool | None = None  # None -> bits == 8
    components: tuple[str, ...] = field(default=DEFAULT_COMPONENTS)
    lm_head_bits: int | None = None  # None -> 8

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise QuantizationError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.bits == 8 and self.group_size is not None:
            raise QuantizationError(
                f"int8 is per output channel (one scale per row): a group size ({self.group_size}) is for int4 only")
        if self.bits == 4:
            group = DEFAULT_INT4_GROUP_SIZE if self.group_size is None else self.group_size
            if group not in INT4_GROUP_SIZES:
                raise QuantizationError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group!r}")
            object.__setattr__(self, "group_size", group)
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.bits == 8)
        components = tuple(self.components)
        unknown = [c for c in components if c not in COMPONENTS]
        if unknown or not components:
            raise QuantizationError(f"components must be a non-empty subset of {sorted(COMPONENTS)}, got {components}")
        object.__setattr__(self, "components", components)
        head = 8 if self.lm_head_bits is None else self.lm_head_bits
        if head not in BITS:
            raise QuantizationError(f"lm_head bits must be 8 or 4, got {self.lm_head_bits!r}")
        object.__setattr__(self, "lm_head_bits", head)

    @classmethod
    def parse(cls, method: str, group_size: int | None = None, **options) -> QuantSpec:
        """"int8" / "int4" (also "8" / "4") -> a spec."""
        name = str(method).strip().lower().removeprefix("int")
        if name not in ("8", "4"):
            raise QuantizationError(f"quantization must be int8 or int4, got {method!r}")
        return cls(int(name), group_size, **options)

    @property
    def name(self) -> str:
        return f"int{self.bits}" + (f", groups of {self.group_size}" if self.bits == 4 else ", per channel") + (
            ", symmetric" if self.symmetric else ", asymmetric") + (
            f", lm_head int{self.lm_head_bits}" if self.lm_head_bits != self.bits and "lm_head" in self.components else "")

    def for_layer(self, name: str) -> QuantSpec:
        """The spec of the linear called `name`: this one, or the lm_head's own width."""
        if name != "lm_head" or self.lm_head_bits == self.bits:
            return self
        return QuantSpec(self.lm_head_bits, self.group_size if self.lm_head_bits == 4 else None,
                         components=self.components, lm_head_bits=self.lm_head_bits)

    def group_for(self, in_features: int) -> int:
        """The group size used for a linear with `in_features` columns (int8: the whole row)."""
        return in_features if self.bits == 8 else self.group_size

    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.bits == 8 else torch.bfloat16

    def targets(self, name: str) -> bool:
        """Does this spec quantize the linear called `name` (our module names)?"""
        return any(re.fullmatch(COMPONENTS[c], name) for c in self.components)

    def to_config(self) -> dict:
        """The `quantization` block of a quantized checkpoint's config.json."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "bits": self.bits,
                "group_size": self.group_size, "symmetric": self.symmetric, "components": list(self.components),
                "lm_head_bits": self.lm_head_bits}

    @classmethod
    def from_config(cls, block: dict, where: str = "config.json") -> QuantSpec:
        if not isinstance(block, dict) or block.get("format") != FORMAT:
            raise QuantizationError(f"{where}: the quantization block is not {FORMAT!r}: {block!r}")
        if block.get("version") not in (1, FORMAT_VERSION):
            raise QuantizationError(f"{where}: quantization format version {block.get('version')!r} is not "
                                    f"1 or {FORMAT_VERSION} (written by another version of idefics2_mini)")
        try:
            return cls(int(block["bits"]), block.get("group_size"), bool(block["symmetric"]),
                       tuple(block["components"]), int(block.get("lm_head_bits", block["bits"])))
        except (KeyError, TypeError) as err:
            raise QuantizationError(f"{where}: incomplete quantization block {block!r} ({err})") from err


@dataclass
class QuantizedWeight:
    """One linear's quantized weight (see kernels/dequant_matmul.py for the layout)."""

    qweight: torch.Tensor  # int8 [N, K] or uint8 [N, K/2]
    scales: torch.Tensor  # [N, K/G]
    zeros: torch.Tensor | None  # [N, K/G] or None (symmetric)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantizedWeight:
    """weight [N, K] float -> its quantized form under `spec` (the rules of the module docstring).
    Works on any block of rows (rows are independent), which is how loading streams big tensors."""
    rows, k = weight.shape
    group = spec.group_for(k)
    if k % group:
        raise QuantizationError(f"group size {group} does not divide the linear's {k} input columns")
    w = weight.detach().float().view(rows, k // group, group)
    scales, zeros = group_grid(w, spec)
    q = round_to_grid(w, scales[..., None], None if zeros is None else zeros[..., None], spec).view(rows, k)
    return QuantizedWeight(q if spec.bits == 8 else pack_int4(q, group), scales, zeros)


def group_grid(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """w [..., G] float, one group per last-dim row -> its grid: scales [...] and zeros [...] (None
    when symmetric), in their storage dtype (the module docstring's rules)."""
    levels = 2**spec.bits  # 256 or 16
    if spec.symmetric:
        scales = (w.abs().amax(-1) / (levels // 2 - 1)).to(spec.scale_dtype())
        return torch.where(scales == 0, torch.ones_like(scales), scales), None
    low, high = w.amin(-1), w.amax(-1)
    scales = ((high - low) / (levels - 1)).to(spec.scale_dtype())
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    return scales, (low + (levels // 2) * scales.float()).to(spec.scale_dtype())


def round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """w float, scales / zeros broadcastable to it (stored dtype) -> the nearest integers q (int8)."""
    levels = 2**spec.bits
    low = -(levels // 2 - 1) if spec.symmetric else -(levels // 2)  # symmetric: [-127, 127] / [-7, 7]
    shifted = w if zeros is None else w - zeros.float()
    return (shifted / scales.float()).round().clamp(low, levels // 2 - 1).to(torch.int8)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """q int8 [N, K] in [-8, 7] -> uint8 [N, K/2]: per group, byte j = (q[j] + 8) | (q[j + G/2] + 8) << 4."""
    rows, k = q.shape
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8).view(rows, k // group_size, 2, group_size // 2)
    return (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(rows, k // 2)
