"""Building blocks shared by the connector and the decoder: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x²) + eps); statistics in fp32, cast back, then × weight.

    Runs `kernels.rms_norm` (Triton on CUDA, the torch reference elsewhere).
    """

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> [..., width]."""
        return kernels.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Mistral MLP, Idefics2 projector and perceiver MLP)."""

    def __init__(self, in_width: int, hidden_width: int, out_width: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.up_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.down_proj = nn.Linear(hidden_width, out_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_width] -> [..., out_width]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
