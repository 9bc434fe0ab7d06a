"""Kernels on the model's hot path: each file holds the Triton kernel, its torch reference and
the dispatching function the model calls (see dispatch.py for the rule)."""

from .attention_decode import attention_decode, attention_decode_reference, attention_decode_triton
from .attention_backward import attention_backward_triton, attention_varlen_backward_triton
from .attention_prefill import (
    AttentionFunction,
    AttentionVarlenFunction,
    attention,
    attention_reference,
    attention_triton,
    attention_varlen,
    attention_varlen_reference,
    attention_varlen_triton,
    visible_keys_mask,
)
from .dispatch import KERNELS_ENV, kernel_mode, triton_available, use_triton
from .rmsnorm import RMSNormFunction, rms_norm, rms_norm_reference
from .dequant_matmul import dequantize_reference, quantized_matmul, quantized_matmul_reference

__all__ = [
    "AttentionFunction",
    "AttentionVarlenFunction",
    "KERNELS_ENV",
    "RMSNormFunction",
    "attention",
    "attention_backward_triton",
    "attention_decode",
    "attention_decode_reference",
    "attention_decode_triton",
    "attention_reference",
    "attention_triton",
    "attention_varlen",
    "attention_varlen_backward_triton",
    "attention_varlen_reference",
    "attention_varlen_triton",
    "dequantize_reference",
    "kernel_mode",
    "quantized_matmul",
    "quantized_matmul_reference",
    "rms_norm",
    "rms_norm_reference",
    "triton_available",
    "use_triton",
    "visible_keys_mask",
]
