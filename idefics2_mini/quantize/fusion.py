"""Fused quantized projections: q/k/v and gate/up, once quantized, served by one kernel call,
as backends/fusion.py does for float linears (which steps aside for quantized ones).

Quantization is per output row (int8: one scale per row; int4: per row and group of columns),
so stacking the rows of linears that read the same input is exact: the fused group's qweight,
scales and zeros are the members' own, back to back, and each member's buffers become row
blocks (views) of them, with no second copy. One call instead of three (q/k/v) or two (gate/up)
saves the per-call cost (~20 us of Python, an OpenMP fork) and, more, the small calls' poor
streaming: on 2 AMD EPYC (Zen 4) cores the 1024-row k/v projections of the 8B-wide decoder ran
at ~15 GB/s alone, against ~25 for the larger linears.

    fuse_quantized_projections(model)            # after quantize(model, ...): copies into place
    fuse_quantized_projections(model, "empty")   # before a load writes the buffers (checkpoint.py)

A fused group runs only while it is exact, like the float one; otherwise it calls the members:
the module must still hold the same QuantizedLinear modules (a LoRA wrapper replaces one) and
their buffers must still be views of the fused ones (`.to()` to another device makes new ones).
"""

from __future__ import annotations

import torch
from torch import nn

from ..backends import fusion as float_fusion
from .linear import QuantizedLinear

MODES = ("copy", "empty")


class FusedQuantizedProjections:
    """Stands in for `module.<method>` (backends/fusion.py's FUSIBLE): x [..., in] -> one
    output per member, [..., out_i] each (views of one result when fused)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], fused: QuantizedLinear, max_rows: int | None):
        self.module, self.names, self.max_rows = module, names, max_rows
        self.members = [getattr(module, name) for name in names]
        self.named_members = list(zip(names, self.members))
        self.sizes = [member.out_features for member in self.members]
        self.fused = fused  # a plain attribute of this object, not a submodule: the checkpoint keeps the members

    def shares_storage(self) -> bool:
        """Are the members' buffers still row blocks of the fused ones?"""
        return self.members[0].qweight.data_ptr() == self.fused.qweight.data_ptr()

    def intact(self) -> bool:
        """Does the module still hold the members, sharing the fused buffers (backends/fusion.py's
        check, which a compiled decode step takes at trace time and re-checks before each step)?"""
        return float_fusion.intact(self)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if float_fusion._intact(self) and (self.max_rows is None or x.numel() <= self.max_rows * x.shape[-1]):  # noqa: SLF001
            self.fused.compute_dtype = self.members[0].compute_dtype  # follows the members' .to(dtype)
            return self.fused(x).split(self.sizes, dim=-1)
        return tuple(getattr(self.module, name)(x) for name in self.names)


def fuse_quantized_projections(model: nn.Module, mode: str = "copy") -> nn.Module:
    """Fuse every group of backends/fusion.py's FUSIBLE in `model` whose members are all
    QuantizedLinear of one format (`fuse_group`). Returns the model."""
    for module in model.modules():
        fuse_group(module, mode)
    return model


def fuse_group(module: nn.Module, mode: str = "copy") -> bool:
    """Fuse `module`'s projection group if it has one whose members are all QuantizedLinear of
    one format (bits, group size, symmetry, input width, bias or not, device); returns whether
    it did. mode "copy": the members' values are copied into the fused buffers; "empty": left
    uninitialised (a loader writes the members afterwards, through their views)."""
    if mode not in MODES:
        raise ValueError(f"fusion mode must be one of {MODES}, got {mode!r}")
    if type(module) not in float_fusion.FUSIBLE:
        return False
    method, names, max_rows = float_fusion.FUSIBLE[type(module)]
    members = [getattr(module, name) for name in names]
    if not all(isinstance(member, QuantizedLinear) for member in members):
        return False
    first = members[0]
    fmt = (first.bits, first.group_size, first.symmetric, first.in_features, first.bias is not None,
           first.qweight.device)
    if first.qweight.device.type == "meta" or any(
            (m.bits, m.group_size, m.symmetric, m.in_features, m.bias is not None, m.qweight.device) != fmt
            for m in members):
        return False
    fused = QuantizedLinear(first.in_features, sum(m.out_features for m in members), first.bits, first.group_size,
                            first.symmetric, first.bias is not None, first.compute_dtype, first.qweight.device)
    start = 0
    with torch.no_grad():
        for member in members:
            rows = slice(start, start + member.out_features)
            for name in ("qweight", "scales", "zeros"):
                block = None if fused._buffers[name] is None else fused._buffers[name][rows]  # noqa: SLF001
                if block is not None and mode == "copy":
                    block.copy_(member._buffers[name])  # noqa: SLF001
                member._buffers[name] = block  # noqa: SLF001  (the member's own storage is freed here)
            if member.bias is not None:
                if mode == "copy":
                    fused.bias[rows].copy_(member.bias)
                member.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
            start += member.out_features
    setattr(module, method, FusedQuantizedProjections(module, names, fused, max_rows))
    return True


def fused_quantized_groups(model: nn.Module) -> list[FusedQuantizedProjections]:
    """The FusedQuantizedProjections installed in `model`, in module order."""
    groups = [module.__dict__.get(method) for module, method in float_fusion.fusible_modules(model)]
    return [group for group in groups if isinstance(group, FusedQuantizedProjections)]
