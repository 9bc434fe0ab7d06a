"""Building blocks shared by the tower, connector and decoder: RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kernels


def embedding(num_embeddings: int, width: int, padding_idx: int | None = None) -> nn.Embedding:
    """nn.Embedding with N(0, 1) rows (its own init) — except on the meta device, where the
    loader builds the model before filling it from the checkpoint: drawing random numbers for a
    meta tensor imports torch._dynamo, over a second of load time for nothing."""
    weight = torch.empty(num_embeddings, width)
    if weight.device.type != "meta":
        with torch.no_grad():
            weight.normal_()
            if padding_idx is not None:
                weight[padding_idx] = 0
    return nn.Embedding(num_embeddings, width, padding_idx=padding_idx, _weight=weight)


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x²) + eps); statistics in fp32, cast back, then × weight
    (Zhang and Sennrich, "Root Mean Square Layer Normalization", arXiv:1910.07467; the cast
    order is Mistral's and Idefics2's).

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
    """down(silu(gate(x)) * up(x)), no biases: the gated MLP of Shazeer, "GLU Variants Improve
    Transformer" (2020), as Mistral's MLP, Idefics2's projector and the perceiver's MLP use it."""

    def __init__(self, in_width: int, hidden_width: int, out_width: int):
        super().__init__()
        self.gate_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.up_proj = nn.Linear(in_width, hidden_width, bias=False)
        self.down_proj = nn.Linear(hidden_width, out_width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_width] -> [..., out_width]."""
        gate, up = self.project_gate_up(x)  # [..., hidden_width] each
        if torch.is_grad_enabled():
            return self.down_proj(F.silu(gate) * up)
        # Inference: reuse gate's memory (for a 3220-patch image that is 185 MB not allocated).
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_proj(x), up_proj(x); one method so that a backend can serve both with one
        matmul (backends/fusion.py)."""
        return self.gate_proj(x), self.up_proj(x)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, for reading and for its probabilities (`output_attentions`):

        probs = softmax(q·kᵀ · scale, with the keys a query may not see set to -inf)
        out   = probs · v

    q [B, Hq, Lq, D]; k, v [B, Hkv, Lk, D], Hq a multiple of Hkv (grouped-query attention:
    query head h reads kv head h // (Hq / Hkv)); visible [B or 1, 1, Lq, Lk] bool or None (all).
    Returns out [B, Hq, Lq, D] and probs [B, Hq, Lq, Lk], both in q's dtype, the softmax taken
    in fp32 as the reference's eager attention does. A query that sees no key gets all-zero
    probabilities and a zero output.

    Only the model's `output_attentions` path runs this; the default path runs `kernels.attention`,
    which never materialises the [Lq, Lk] matrix."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [B, Hq, Lk, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    probs = scores.float().softmax(dim=-1).nan_to_num(0.0).to(q.dtype)  # a row of only -inf -> NaN -> 0
    return torch.matmul(probs, v), probs
