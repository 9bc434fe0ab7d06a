"""Training levers applied to a model from outside: which parameters train, activation
checkpointing per layer, fp32 master weights for a bf16 model, and the optimizer step.

    model = Idefics2.from_pretrained(path)              # parameters come back frozen
    lora.apply(model, rank=8)                           # adapters train (lora.py) ...
    set_trainable(model, [r"connector\\..*"])            # ... and/or whole parameters by name
    enable_checkpointing(model)                         # recompute each layer in backward
    step = OptimizerStep(trainable_parameters(model), lr=1e-4)
    out = model(**batch, labels=labels); out.loss.backward(); step()

None of these changes a model file: checkpointing replaces a layer's `forward` on the
instance (parameter names unchanged), freezing is `requires_grad`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .loading import ours_to_official


def set_trainable(model: nn.Module, patterns: Iterable[str], trainable: bool = True) -> list[str]:
    """Set requires_grad on every parameter whose name (ours, e.g. `vision.layers.0.mlp.fc1.weight`,
    or official, `model.vision_model.encoder.layers.0.mlp.fc1.weight`) fully matches a regular
    expression; returns the names set. A pattern that matches nothing is an error."""
    names = []
    for pattern in patterns:
        regex = re.compile(pattern)
        matched = [n for n, _ in model.named_parameters() if regex.fullmatch(n) or regex.fullmatch(_official(n))]
        if not matched:
            raise ValueError(f"no parameter name matches {pattern!r} (names look like 'text.layers.0.mlp.up_proj.weight')")
        names += matched
    parameters = dict(model.named_parameters())
    for name in names:
        parameters[name].requires_grad_(trainable)
    return names


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


# ----------------------------------------------------------------------------- checkpointing


def checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    """The units recomputed in backward: every vision, perceiver and decoder layer, and the
    projector, whose 14336-wide activations of every patch are a training step's largest."""
    stacks = (model.vision.layers, [model.connector.modality_projection],
              model.connector.perceiver_resampler.layers, model.text.layers)
    return [layer for stack in stacks for layer in stack]


def enable_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Activation checkpointing per layer: a layer keeps only its input for backward and runs
    its forward again there (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
    The non-reentrant form is used, so a layer whose input does not require grad (the frozen
    embeddings under LoRA) still passes gradients to its adapters. Only while gradients are
    being recorded; inference is untouched. Returns the number of layers changed."""
    layers = checkpointed_layers(model)
    for layer in layers:
        if enabled and "forward" not in vars(layer):
            layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        elif not enabled and "forward" in vars(layer):
            del layer.forward
    return len(layers)


def _checkpointed_forward(forward, *args, **kwargs):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


# ----------------------------------------------------------------------------- optimizer


class OptimizerStep:
    """AdamW on the trainable parameters, with fp32 master copies of those that are stored in
    a lower precision (a bf16 model): the optimizer updates the fp32 copy and the bf16
    parameter takes its rounded value, so updates far below bf16's resolution still add up.
    fp32 parameters (LoRA adapters, an fp32 model) are updated in place, no copy.

    `step()` (or calling the object) applies the accumulated gradients and clears them;
    `clip_norm` clips the global gradient norm first. `lr` can be changed between steps."""

    def __init__(self, parameters: dict[str, nn.Parameter], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), clip_norm: float | None = 1.0):
        if not parameters:
            raise ValueError("nothing to train: no parameter requires a gradient")
        self.parameters = parameters
        self.master = {
            name: p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
            for name, p in parameters.items()
        }
        self.optimizer = torch.optim.AdamW(list(self.master.values()), lr=lr, betas=betas, weight_decay=weight_decay)
        self.clip_norm = clip_norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def __call__(self) -> float:
        return self.step()

    def step(self) -> float:
        """Apply the gradients; returns the gradient norm before clipping."""
        for name, p in self.parameters.items():
            master = self.master[name]
            if master is not p:
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        grads = [m for m in self.master.values() if m.grad is not None]
        if self.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(grads, self.clip_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([g.grad.norm() for g in grads]))) if grads else 0.0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, p in self.parameters.items():
                if self.master[name] is not p:
                    p.copy_(self.master[name])
        return norm

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "master": {name: m.detach() for name, m in self.master.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.master) - set(state["master"]))
        if missing:
            raise ValueError(f"the saved training state has no value for {missing[:3]}: it was made for other trainable parameters")
        with torch.no_grad():
            for name, value in state["master"].items():
                if name in self.master:
                    self.master[name].copy_(value)
                    self.parameters[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int = 0, schedule: str = "linear") -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup from 0 over
    `warmup_steps`, then `constant`, `linear` decay to 0, or `cosine` decay to 0 at `total_steps`."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}; use constant, linear or cosine")


def _official(name: str) -> str:
    try:
        return ours_to_official(name)
    except KeyError:
        return name
