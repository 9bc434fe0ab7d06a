"""LoRA: low-rank adapters on frozen linears (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685), in plain torch.

A wrapped linear keeps its frozen weight W [out, in] (and bias) under the same names and adds

    y = x Wᵀ + b + (alpha / r) · B(A(dropout(x)))     A: [r, in] random,  B: [out, r] zero

so training starts from exactly the base model. Merging folds the update into W
(W += (alpha / r) · B A) for inference at the base model's speed; unmerging takes it out again.

The adapter file is PEFT's layout (`adapter_model.safetensors` with
`base_model.model.<official module>.lora_A.weight` / `.lora_B.weight`, and `adapter_config.json`),
so an adapter trained here loads into the reference with `peft.PeftModel.from_pretrained`, and
one trained there loads here. Module names are matched by regular expression against either
our names (`text.layers.0.self_attn.q_proj`) or the official ones
(`model.text_model.layers.0.self_attn.q_proj`); the default targets are those of the model's
own fine-tuning recipe: the decoder's, the projector's and the perceiver's attention and MLP
projections, the vision tower left alone.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .files import write_atomically
from .loading import ours_to_official

# The Idefics2 recipe's target_modules, written for our module names.
DEFAULT_TARGETS = (
    r"text\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    r"connector\.modality_projection\.(gate|up|down)_proj",
    r"connector\.perceiver_resampler\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Linear):
    """A linear with a LoRA update (see the module docstring). Its `weight` and `bias` are the
    wrapped linear's own Parameters (names and values unchanged); `lora_A` [r, in] and
    `lora_B` [out, r] are new, in fp32 by default even when the base is bf16 (they are the
    trained parameters: fp32 keeps the small updates that bf16 would round away)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base's parameters are reused, not made
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        # A like nn.Linear's own init, B zero: the update starts at exactly 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) · B A as a [out, in] matrix in the lora dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        # In place: the base output is not needed for backward, and for the projector's
        # 14336-wide activations of every patch two fewer temporaries is ~0.5 GB less at the peak.
        return out.add_(update.to(out.dtype), alpha=self.scaling)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def as_linear(self) -> nn.Linear:
        """A plain linear with this module's (merged or not) weight and bias."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def matching_linears(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the nn.Linear modules whose name (ours or official) fully matches a pattern."""
    patterns = [re.compile(t) for t in targets]
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) and ".lora_" not in name:
            candidates = (name, _official_or_none(name))
            if any(p.fullmatch(c) for p in patterns for c in candidates if c is not None):
                names.append(name)
    return names


def apply(
    model: nn.Module,
    targets: Iterable[str] | None = None,
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Wrap every nn.Linear matched by `targets` (default DEFAULT_TARGETS) in a LoRALinear,
    freeze every other parameter of the model, and return the wrapped names.

    Train more than the adapters with `training.set_trainable(model, patterns)` afterwards."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    targets = tuple(DEFAULT_TARGETS if targets is None else targets)
    names = matching_linears(model, targets)
    if not names:
        raise ValueError(f"no linear layer of the model matches the LoRA targets {list(targets)}")
    model.requires_grad_(False)
    # A fused q/k/v or gate/up group (backends/fusion.py) notices that one of its linears was
    # replaced and runs them one by one from then on, adapters included.
    for name in names:
        parent, attribute = _parent(model, name)
        setattr(parent, attribute, LoRALinear(getattr(parent, attribute), rank, alpha, dropout, dtype))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight (inference at the base model's cost)."""
    for module in lora_modules(model).values():
        module.merge()


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of its weight."""
    for module in lora_modules(model).values():
        module.unmerge()


def remove(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by a plain linear, with the update merged into the weight
    (`merge=True`, the fine-tuned model) or dropped (`merge=False`, the base model back)."""
    for name, module in lora_modules(model).items():
        if merge:
            module.merge()
        else:
            module.unmerge()
        parent, attribute = _parent(model, name)
        setattr(parent, attribute, module.as_linear())
    return model


@contextlib.contextmanager
def merged_into_base(model: nn.Module):
    """Within the block the model is a plain model with the updates folded into its weights
    (no LoRA module, no lora_* parameter: what a full checkpoint holds); afterwards the
    adapters are back, unmerged."""
    modules = lora_modules(model)
    for name, module in modules.items():
        module.merge()
        parent, attribute = _parent(model, name)
        setattr(parent, attribute, module.as_linear())
    try:
        yield model
    finally:
        for name, module in modules.items():
            parent, attribute = _parent(model, name)
            setattr(parent, attribute, module)
            module.unmerge()


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's names: base_model.model.<official>.lora_A.weight ..."""
    tensors = {}
    for name, module in lora_modules(model).items():
        official = ours_to_official(name)
        tensors[f"{_PEFT_PREFIX}{official}.lora_A.weight"] = module.lora_A.weight.detach()
        tensors[f"{_PEFT_PREFIX}{official}.lora_B.weight"] = module.lora_B.weight.detach()
    return tensors


def adapter_config(model: nn.Module) -> dict:
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (call lora.apply first)")
    first = next(iter(modules.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted(ours_to_official(name) for name in modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "task_type": None,
        "base_model_name_or_path": None,
    }


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write adapter_model.safetensors + adapter_config.json into `directory` (each file
    written next to its place, then renamed over it)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model)
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
    write_atomically(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    write_atomically(directory / ADAPTER_CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return directory


def load_adapter(model: nn.Module, directory: str | Path, dtype: torch.dtype = torch.float32) -> list[str]:
    """Apply (if not yet applied) and fill the adapters saved in `directory`; returns the wrapped
    names. Errors name the missing file or the tensor that does not fit."""
    from safetensors.torch import load_file  # noqa: PLC0415

    directory = Path(directory)
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: not a LoRA adapter folder (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from err
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config:
        raise ValueError(f"{config_file} does not describe a LoRA adapter (needs peft_type LORA and r)")
    try:
        tensors = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{weights_file} is not a readable safetensors file: {err}") from err
    modules = lora_modules(model)
    if not modules:
        targets = config.get("target_modules") or DEFAULT_TARGETS
        targets = [targets] if isinstance(targets, str) else [re.escape(t) if "." in t else rf".*\.{t}" for t in targets]
        apply(model, targets, int(config["r"]), float(config.get("lora_alpha", config["r"])),
              float(config.get("lora_dropout", 0.0)), dtype)
        modules = lora_modules(model)
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not fit this model's adapters: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    by_name = {ours_to_official(name): module for name, module in modules.items()}
    with torch.no_grad():
        for key, value in tensors.items():
            official, part = key[len(_PEFT_PREFIX):].rsplit(".", 2)[0], key.rsplit(".", 2)[1]
            target = getattr(by_name[official], part).weight
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key} in {weights_file} has shape {list(value.shape)}, the model needs {list(target.shape)}")
            target.copy_(value)
    return list(modules)


def _official_or_none(name: str) -> str | None:
    try:
        return ours_to_official(name)
    except KeyError:
        return None


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attribute = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attribute
