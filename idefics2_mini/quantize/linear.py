"""QuantizedLinear (a module that stands in for an nn.Linear) and `quantize(model, ...)`, the
swap applied from outside the model, like the backends (gpt-fast's WeightOnlyInt8Linear).

A QuantizedLinear holds the quantized weight as buffers (qweight, scales, zeros: the layout of
kernels/dequant_matmul.py) and the bias, if any, as a parameter in the compute dtype. It is its
own fast path, chosen per call:

    CUDA (or IDEFICS2_MINI_KERNELS=triton)   kernels.quantized_matmul (Triton)
    CPU, up to 8 rows (decode)               qmatmul.c (quantize/cpu.py), streaming the stored bytes
    otherwise (prefill, training)            dequantize a block of rows, float matmul (cpu.dequantized_linear)

so the CPU backends' CpuLinear swap (backends/cpu.py, which converts only plain nn.Linear) and
the float fused projections (backends/fusion.py, which step aside when a module's linears are
replaced) leave it alone; quantize/fusion.py fuses quantized groups instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels.dispatch import use_triton
from kernels.dequant_matmul import check_format, dequantize_reference, quantized_matmul

from . import cpu
from .formats import QuantizationError, QuantizedWeight, QuantSpec, quantize_weight

# Rows of a weight quantized at once (quantize_weight's temporaries are a few times this many
# fp32 elements), so quantizing a model in place never holds a second full-size weight.
QUANTIZE_BLOCK_ELEMENTS = 2**22


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W weight-only quantized (int8 per channel or int4 group-wise)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 bias: bool = False, compute_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        if in_features % group_size or (bits == 4 and in_features % 2):
            raise QuantizationError(f"group size {group_size} does not divide the {in_features} input columns")
        q_cols = in_features if bits == 8 else in_features // 2
        q_dtype = torch.int8 if bits == 8 else torch.uint8
        scale_dtype = torch.float32 if bits == 8 else torch.bfloat16
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, q_cols, dtype=q_dtype, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("zeros", None if symmetric else torch.empty(out_features, groups, dtype=scale_dtype,
                                                                        device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None
        # The activations' dtype: what the layer returns (the buffers never say it).
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec, quantized: QuantizedWeight | None = None
                    ) -> QuantizedLinear:
        """`linear` quantized (the linear is left as it was): its weight rounded to nearest, in
        blocks of rows, or `quantized` if given (the whole weight, e.g. from gptq.py)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, spec.bits, spec.group_for(linear.in_features),
                     spec.symmetric, linear.bias is not None, weight.dtype, weight.device)
        block = max(1, QUANTIZE_BLOCK_ELEMENTS // linear.in_features)
        with torch.no_grad():
            if quantized is not None:
                module.set_rows(0, quantized)
            else:
                for start in range(0, linear.out_features, block):
                    module.set_rows(start, quantize_weight(weight[start : start + block], spec))
            if linear.bias is not None:
                module.bias.copy_(linear.bias)
        module.check()
        return module

    def set_rows(self, start: int, quantized) -> None:
        """Write a formats.QuantizedWeight for rows start.. into the buffers."""
        rows = slice(start, start + quantized.qweight.shape[0])
        self.qweight[rows] = quantized.qweight.to(self.qweight.device)
        self.scales[rows] = quantized.scales.to(self.scales.device)
        if self.zeros is not None:
            self.zeros[rows] = quantized.zeros.to(self.zeros.device)

    def check(self) -> None:
        """Raise ValueError if the buffers are not a consistent quantized weight."""
        check_format(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer multiplies by, [out, in] (in the compute dtype unless given)."""
        weight = dequantize_reference(self.qweight, self.scales, self.zeros, self.bits, self.group_size)
        return weight.to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if x.device.type == "cuda" or use_triton(x):
            return quantized_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias)
        if cpu.kernel_takes(x, self.bits, self.group_size):
            # eager: the ctypes call itself (the custom op's dispatch costs ~10 us a call)
            matmul = cpu.kernel_matmul_op if torch.compiler.is_compiling() else cpu.kernel_matmul
            out = matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size)
            return out if self.bias is None else out + self.bias
        return cpu.dequantized_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.bias)

    def _apply(self, fn, recurse=True):
        # .to(dtype) converts floating buffers: the scales keep their storage dtype (the format
        # fixes it) while the compute dtype follows the conversion.
        scales, zeros = self.scales, self.zeros
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=scales.device))
        self.compute_dtype = probe.dtype
        for name, before in (("scales", scales), ("zeros", zeros)):
            after = getattr(self, name)
            if after is not None and after.dtype != before.dtype:
                # the stored tensor itself (moved if the conversion moved): converting back would
                # round fp32 scales through the new dtype, and a fused group's views would be lost
                self._buffers[name] = before.to(after.device)  # noqa: SLF001
        return self

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" + (f", group_size={self.group_size}" if self.bits == 4 else ", per channel")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, bias={self.bias is not None}")


def quantized_linear_names(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Names of the nn.Linear modules of `model` that `spec` quantizes."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and spec.targets(name)]


def checked_linear_names(model: nn.Module, spec: QuantSpec) -> list[str]:
    """`quantized_linear_names`, after checking that the spec fits every one of them."""
    names = quantized_linear_names(model, spec)
    if not names:
        raise QuantizationError(f"no linear of the model matches the components {spec.components}")
    misfits = [f"{name} ({model.get_submodule(name).in_features} columns)" for name in names
               if model.get_submodule(name).in_features
               % spec.for_layer(name).group_for(model.get_submodule(name).in_features)]
    if misfits:
        raise QuantizationError(
            f"int{spec.bits} group size {spec.group_size} does not divide the input width of {len(misfits)} "
            f"linear(s): {', '.join(misfits[:3])}{' and more' if len(misfits) > 3 else ''}; choose a group size "
            f"that divides them (one of 32, 64, 128) or leave their component float (--components)")
    return names


def quantize(model: nn.Module, bits: int | str | QuantSpec = 8, group_size: int | None = None,
             symmetric: bool | None = None, components: tuple[str, ...] | None = None) -> nn.Module:
    """Replace the linears of `model` chosen by the spec (default: decoder, connector, lm_head)
    by QuantizedLinear, in place; returns the model. `bits`: 8, 4, "int8", "int4" or a QuantSpec.

    Each weight is quantized in blocks of rows and dropped as soon as its layer is replaced
    (peak memory: the model plus one weight). A fused projection group (backends/fusion.py)
    whose linears are replaced is unfused, so its fused matrix is freed too; the rest of the
    backends need nothing (they leave a QuantizedLinear alone). A tied lm_head (sharing the
    embedding's weight) is quantized as a copy: the embedding stays float. A group that was
    fused is fused again, quantized (quantize/fusion.py: one kernel call for q/k/v, gate/up)."""
    spec = _spec(bits, group_size, symmetric, components)
    replace_linears(model, checked_linear_names(model, spec),
                    lambda name, linear: QuantizedLinear.from_linear(linear, spec.for_layer(name)))
    model.quantization = spec
    return model


def replace_linears(model: nn.Module, names: list[str], make: Callable[[str, nn.Linear], QuantizedLinear]) -> None:
    """Replace each linear of `names` by `make(name, linear)`, in order (each weight dropped as
    soon as its layer is replaced); a fused float group losing a member is unfused, and fused
    again, quantized, once all are replaced (quantize/fusion.py)."""
    from .fusion import fuse_group  # noqa: PLC0415  (it imports this module)

    refuse = []  # modules whose float projections were fused: fused again once quantized
    for name in names:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attribute)
        if linear.weight.requires_grad:
            raise QuantizationError(f"{name}.weight requires grad: quantize a model for inference "
                                    "(weight-only quantized layers are not trained)")
        setattr(parent, attribute, make(name, linear))
        if unfuse_float_group(parent):
            refuse.append(parent)
    for parent in refuse:
        fuse_group(parent, "copy")


def unfuse_float_group(module: nn.Module) -> bool:
    """Drop `module`'s fused float projections (backends/fusion.py), if it has them; whether it did."""
    from ..backends import fusion  # noqa: PLC0415

    if fusion.fused_group(module) is None:
        return False
    module.__dict__.pop(fusion.FUSIBLE[type(module)][0], None)
    return True


def _spec(bits, group_size, symmetric, components) -> QuantSpec:
    if isinstance(bits, QuantSpec):
        if group_size is not None or symmetric is not None or components is not None:
            raise QuantizationError("pass either a QuantSpec or bits/group_size/symmetric/components, not both")
        return bits
    options = {} if components is None else {"components": tuple(components)}
    if isinstance(bits, str):
        return QuantSpec.parse(bits, group_size, symmetric=symmetric, **options)
    return QuantSpec(bits, group_size, symmetric, **options)
