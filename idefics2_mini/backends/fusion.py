"""Fused projections: linears that read the same input (q/k/v, gate/up) served by one matmul,
as gpt-fast's `wqkv` and vLLM's merged column-parallel linears do, but keeping the checkpoint's
separate modules and names.

The model computes each projection with its own nn.Linear, through one method per group:

    TextAttention.project_qkv(x)      -> q_proj(x), k_proj(x), v_proj(x)
    VisionAttention.project_qkv(x)    -> the same
    PerceiverAttention.project_kv(x)  -> k_proj(x), v_proj(x)
    SwiGLU.project_gate_up(x)         -> gate_proj(x), up_proj(x)

`fuse_projections(model)` replaces that method, on each instance, by a `FusedProjections`: ONE
weight matrix whose row blocks *are* the linears' parameters (views, no second copy), so one
matmul reads all the weights in one pass and, for small (decode) inputs, pays one call's
overhead instead of three. Parameter names stay the linears' own (q_proj.weight, ...).

A fused group runs only while it is exact; otherwise it calls the linears one by one:
- the parameters must still be views of the fused matrix: moving or converting the model
  (`.to()`) makes new, separate tensors (call `fuse_projections` again to re-fuse);
- the module must still hold the same linears (a LoRA wrapper replaces one: it then runs);
- no gradient may be wanted (training uses the plain linears);
- gate/up only up to SWIGLU_FUSED_MAX_ROWS input rows.
"""

from __future__ import annotations

import torch
from torch import nn

from ..connector import PerceiverAttention
from ..layers import SwiGLU
from ..text import TextAttention
from ..vision import VisionAttention
from . import cpu

# Above this many input rows the two halves of a fused gate/up output are big strided views,
# and silu and the product over them cost more than the fused matmul saves (profiled on a
# 3220-patch image: +0.45 s at the projector).
SWIGLU_FUSED_MAX_ROWS = 512

# module type -> (the method a fused group replaces, the linears it serves, most input rows)
FUSIBLE: dict[type, tuple[str, tuple[str, ...], int | None]] = {
    TextAttention: ("project_qkv", ("q_proj", "k_proj", "v_proj"), None),
    VisionAttention: ("project_qkv", ("q_proj", "k_proj", "v_proj"), None),
    PerceiverAttention: ("project_kv", ("k_proj", "v_proj"), None),
    SwiGLU: ("project_gate_up", ("gate_proj", "up_proj"), SWIGLU_FUSED_MAX_ROWS),
}

FUSE_MODES = ("copy", "empty", "mapped")

# "mapped" mode copies a group whose weights are not back to back in the file only when they
# are this small together: there three matmuls instead of one cost mostly per-call overhead,
# and the copy is cheap; a big matmul gains next to nothing from fusion, and copying it would
# cost load time and memory.
MAPPED_COPY_MAX_ELEMENTS = 2**19


class FusedProjections:
    """Stands in for `module.<method>` (see the module docstring): x [..., in] -> one output per
    linear, [..., out_i] each (views of one result when fused)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], weight: torch.Tensor,
                 bias: torch.Tensor | None, max_rows: int | None = None):
        """weight [sum out_i, in] (bias [sum out_i]) must already hold the linears' parameters
        as its row blocks; `fuse_linears` makes one."""
        self.module, self.names, self.max_rows = module, names, max_rows
        self.members = [getattr(module, name) for name in names]
        self.named_members = list(zip(names, self.members))
        self.sizes = [member.out_features for member in self.members]
        self.weight, self.bias = weight, bias

    def shares_storage(self) -> bool:
        """Are the linears' weights still row blocks of the fused matrix?"""
        return self.members[0]._parameters["weight"].data_ptr() == self.weight.data_ptr()  # noqa: SLF001

    def current(self) -> bool:
        """True while the fused matrix may stand in for the linears (see the module docstring)."""
        if torch.is_grad_enabled() and self.members[0]._parameters["weight"].requires_grad:  # noqa: SLF001
            return False
        return _intact(self)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.current() and (self.max_rows is None or x.numel() <= self.max_rows * x.shape[-1]):
            matmul = cpu.linear if isinstance(self.members[0], cpu.CpuLinear) else torch.nn.functional.linear
            return matmul(x, self.weight, self.bias).split(self.sizes, dim=-1)
        return tuple(getattr(self.module, name)(x) for name in self.names)


def intact(fused) -> bool:
    """Does the module still hold the linears the group was made from, and are their weights
    still row blocks of the fused matrix (not moved or converted)? Plain dict lookups, not
    nn.Module's getattr: this runs on every call of the decode path. `fused`: a
    FusedProjections, or anything with its `module`, `named_members` and `shares_storage()`
    (quantize/fusion.py's quantized groups, which compiled.py checks the same way)."""
    children = fused.module._modules  # noqa: SLF001
    for name, member in fused.named_members:
        if children.get(name) is not member:
            return False
    return fused.shares_storage()


# The check as FusedProjections.current() calls it; `prepare_for_compile` rebinds it.
_intact = intact


def prepare_for_compile() -> None:
    """Called before torch.compile traces the model (`compiled.compile_decode`): Dynamo cannot
    trace data_ptr(), so `intact` is taken at trace time as a constant, and the compiled step
    checks it itself before every call. Done here, not at import, because marking imports
    torch._dynamo: a second of import time nobody else should pay."""
    global _intact  # noqa: PLW0603
    _intact = torch.compiler.assume_constant_result(intact)


def fuse_projections(model: nn.Module, mode: str = "copy") -> nn.Module:
    """Fuse every group of FUSIBLE in `model`. mode:

    - "copy": a new matrix holding the linears' values; their parameters become its row blocks;
    - "empty": the same layout, values left uninitialised (the loader copies the checkpoint
      into the parameters afterwards);
    - "mapped" (parameters that are views of a memory-mapped checkpoint): a view spanning their
      weights (and biases) when those already lie back to back, in order, in one storage (no
      new memory; gate/up in the official files); otherwise a copy when they are small
      (MAPPED_COPY_MAX_ELEMENTS), else the group stays unfused.
    """
    if mode not in FUSE_MODES:
        raise ValueError(f"fusion mode must be one of {FUSE_MODES}, got {mode!r}")
    for module in model.modules():
        if type(module) in FUSIBLE:
            method, names, max_rows = FUSIBLE[type(module)]
            module.__dict__.pop(method, None)
            if not all(isinstance(getattr(module, name), nn.Linear) for name in names):
                continue  # a linear replaced by another kind of layer (a quantized one) runs on its own
            fused = fuse_linears(module, names, mode, max_rows)
            if fused is not None:
                setattr(module, method, fused)
    return model


def unfuse_projections(model: nn.Module) -> nn.Module:
    """Back to the model's own methods: every linear runs on its own."""
    for module in model.modules():
        if type(module) in FUSIBLE:
            module.__dict__.pop(FUSIBLE[type(module)][0], None)
    return model


def fusible_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, the method a fused group replaces) for every module of `model` that can fuse."""
    return [(module, FUSIBLE[type(module)][0]) for module in model.modules() if type(module) in FUSIBLE]


def fused_group(module: nn.Module) -> FusedProjections | None:
    """The FusedProjections installed in `module` (an attention or a SwiGLU), if any."""
    fused = module.__dict__.get(FUSIBLE[type(module)][0]) if type(module) in FUSIBLE else None
    return fused if isinstance(fused, FusedProjections) else None


def fused_groups(model: nn.Module) -> list[FusedProjections]:
    """The FusedProjections installed in `model`, in module order."""
    return [group for group in map(fused_group, model.modules()) if group is not None]


def fuse_linears(module: nn.Module, names: tuple[str, ...], mode: str = "copy",
                 max_rows: int | None = None) -> FusedProjections | None:
    """Fuse the linears `names` of `module` (see `fuse_projections` for the modes)."""
    linears = [getattr(module, name) for name in names]
    has_bias = [linear.bias is not None for linear in linears]
    if any(has_bias) and not all(has_bias):
        raise ValueError("cannot fuse linears where only some have a bias")
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears] if all(has_bias) else None
    if mode == "mapped":
        weight = _span(weights)
        bias = None if biases is None else _span(biases)
        if weight is not None and (biases is None or bias is not None):
            return FusedProjections(module, names, weight, bias, max_rows)
        if sum(w.numel() for w in weights) >= MAPPED_COPY_MAX_ELEMENTS:
            return None
        mode = "copy"
    with torch.no_grad():
        weight = _stack_rows(weights, mode == "copy")
        bias = None if biases is None else _stack_rows(biases, mode == "copy")
    start = 0
    for linear in linears:
        size = linear.out_features
        linear.weight = nn.Parameter(weight[start : start + size], requires_grad=linear.weight.requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[start : start + size], requires_grad=linear.bias.requires_grad)
        start += size
    return FusedProjections(module, names, weight, bias, max_rows)


def _stack_rows(tensors: list[torch.Tensor], copy_values: bool) -> torch.Tensor:
    """Concatenate along dim 0 into new storage (uninitialised unless copy_values)."""
    if copy_values:
        return torch.cat(tensors)
    first = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    return torch.empty(rows, *first.shape[1:], dtype=first.dtype, device=first.device)


def _span(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor viewing `tensors` stacked along dim 0, when they are contiguous and lie back
    to back in one storage; else None."""
    first = tensors[0]
    if first.device.type == "meta":
        return None
    offset = first.storage_offset()
    for tensor in tensors:
        if (
            not tensor.is_contiguous()
            or tensor.dtype != first.dtype
            or tensor.shape[1:] != first.shape[1:]
            or tensor.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or tensor.storage_offset() != offset
        ):
            return None
        offset += tensor.numel()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
