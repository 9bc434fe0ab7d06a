"""RMSNorm: y = weight * (x / sqrt(mean(x^2) + eps)), optionally after a fused residual add.

Cast order is the model's (Mistral / Idefics2): statistics in fp32, the normalised value cast
back to the input dtype, *then* multiplied by the weight.
"""

from __future__ import annotations

import torch

from .dispatch import use_triton  # noqa: F401


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [..., N]; weight: [N].

    Returns y [..., N], or (y, x + residual) when `residual` is given (the sum is the next
    layer's residual stream).
    """
    summed = None
    if residual is not None:
        x = x + residual
        summed = x
    input_dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    y = weight * (x32 * torch.rsqrt(variance + eps)).to(input_dtype)
    return y if summed is None else (y, summed)


def rms_norm(x, weight, eps, residual=None):
    """Dispatching RMSNorm (same signature and result as `rms_norm_reference`)."""
    # The Triton kernel lands here (issue 5); until then every device runs the reference.
    return rms_norm_reference(x, weight, eps, residual)
