"""The training objective: next-token cross-entropy over the tokens the labels count.

    labels [B, T]: the token each position should *be* (usually input_ids), or -100 where the
    position is not trained on (user turns, image tokens, padding; see
    `Idefics2Processor.training_batch`). Position t's logits predict token t + 1, so the labels
    are shifted by one inside, as in the reference (transformers' `ForCausalLMLoss`):

        loss = sum over counted t of -log softmax(logits[t])[labels[t + 1]] / num_counted

Logits are upcast to fp32 first (a bf16 softmax over 32k entries loses the small
probabilities that the gradient is made of).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, T] -> targets [B, T]: position t's target is labels[t + 1]; the last is -100."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_counted: int | torch.Tensor | None = None
) -> torch.Tensor:
    """logits [B, T, V], labels [B, T] -> scalar mean cross-entropy over counted targets.

    `num_counted` replaces the divisor: with gradient accumulation over micro-batches, pass the
    number of counted targets of the whole accumulated batch so that every token weighs the
    same however the tokens fall into micro-batches (the reference's `num_items_in_batch`).
    """
    targets = shift_labels(labels)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), num_counted)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, num_counted: int | torch.Tensor | None = None
) -> torch.Tensor:
    """logits [N, V], targets [N] (-100 = not counted) -> scalar: mean over counted rows, or
    sum / num_counted. No counted row gives 0 (with a gradient path), not NaN."""
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if num_counted is None:
        num_counted = (targets != IGNORE_INDEX).sum()
    if isinstance(num_counted, torch.Tensor):
        return total / num_counted.to(total.device).clamp(min=1)
    return total / max(int(num_counted), 1)
