"""Model configuration: plain frozen dataclasses, one per box of the architecture.

`Idefics2Config.from_pretrained(dir)` / `.from_dict(d)` read a checkpoint's config.json in both
formats seen in the wild:

- the official HuggingFaceM4/idefics2-8b file (transformers 4.40 era): `rope_theta` at the top of
  `text_config`, a sparse `perceiver_config` holding only `model_type`, many text fields left out;
- what newer transformers writes: `rope_parameters: {rope_theta, rope_type}`, every perceiver
  field spelled out, `dtype` instead of `torch_dtype`.

Where a file is silent, the defaults below are the values the released Idefics2-8B was trained
with (not the defaults of the transformers classes, which describe other models).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .tokens import BOS_TOKEN_ID, EOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, VOCAB_SIZE



class ConfigError(ValueError):
    """A config.json that cannot describe a valid Idefics2 model."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP-so400m vision tower with NaViT-style variable-resolution positions."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 980  # side of the largest image; the position table is (image_size // patch_size)²
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def validate(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            _check(getattr(self, name) > 0, f"vision_config.{name} must be positive, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"vision_config.hidden_size ({self.hidden_size}) must be divisible by "
               f"vision_config.num_attention_heads ({self.num_attention_heads})")
        _check(self.image_size >= self.patch_size,
               f"vision_config.image_size ({self.image_size}) must be >= patch_size ({self.patch_size})")
        _check(self.hidden_act == "gelu_pytorch_tanh",
               f"vision_config.hidden_act={self.hidden_act!r}: only 'gelu_pytorch_tanh' (SigLIP) is supported")


@dataclass(frozen=True)
class PerceiverConfig:
    """Perceiver resampler: `resampler_n_latents` learned queries compress each image."""

    hidden_size: int = 4096
    rms_norm_eps: float = 1e-5
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4
    hidden_act: str = "silu"

    def validate(self) -> None:
        for name in ("hidden_size", "resampler_n_latents", "resampler_depth", "resampler_n_heads",
                     "resampler_head_dim", "num_key_value_heads"):
            _check(getattr(self, name) > 0, f"perceiver_config.{name} must be positive, got {getattr(self, name)}")
        _check(self.resampler_n_heads % self.num_key_value_heads == 0,
               f"perceiver_config.num_key_value_heads ({self.num_key_value_heads}) must divide "
               f"perceiver_config.resampler_n_heads ({self.resampler_n_heads})")
        _check(self.hidden_act == "silu", f"perceiver_config.hidden_act={self.hidden_act!r}: only 'silu' is supported")


@dataclass(frozen=True)
class TextConfig:
    """Mistral-7B-v0.1 decoder (plus 3 added token rows: vocab 32003)."""

    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096
    hidden_act: str = "silu"
    pad_token_id: int = PAD_TOKEN_ID
    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID
    tie_word_embeddings: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _check(getattr(self, name) > 0, f"text_config.{name} must be positive, got {getattr(self, name)}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0,
               f"text_config.num_key_value_heads ({self.num_key_value_heads}) must divide "
               f"text_config.num_attention_heads ({self.num_attention_heads})")
        _check(self.head_dim % 2 == 0, f"text_config.head_dim ({self.head_dim}) must be even for RoPE")
        _check(self.sliding_window is None or self.sliding_window >= 1,
               f"text_config.sliding_window must be None or >= 1, got {self.sliding_window}")
        _check(self.rope_theta > 0, f"text_config.rope_theta must be positive, got {self.rope_theta}")
        _check(self.hidden_act == "silu", f"text_config.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        _check(0 <= self.pad_token_id < self.vocab_size,
               f"text_config.pad_token_id ({self.pad_token_id}) must be a token id below vocab_size ({self.vocab_size})")


@dataclass(frozen=True)
class Idefics2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = IMAGE_TOKEN_ID
    # The dtype the checkpoint was saved in (informational; from_pretrained takes its own dtype).
    checkpoint_dtype: str | None = None
    # A weight-only quantized checkpoint's `quantization` block (idefics2_mini/quantize/ reads
    # and checks it); None for a float checkpoint.
    quantization: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def image_seq_len(self) -> int:
        """Tokens each image becomes in the decoder (= number of perceiver latents)."""
        return self.perceiver.resampler_n_latents

    def validate(self) -> None:
        self.vision.validate()
        self.perceiver.validate()
        self.text.validate()
        _check(self.perceiver.hidden_size == self.text.hidden_size,
               f"perceiver_config.hidden_size ({self.perceiver.hidden_size}) must equal "
               f"text_config.hidden_size ({self.text.hidden_size}): the resampler works in the decoder's width")
        _check(0 <= self.image_token_id < self.text.vocab_size,
               f"image_token_id ({self.image_token_id}) must be below text_config.vocab_size ({self.text.vocab_size})")

    # ----------------------------------------------------------------- reading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Idefics2Config:
        """Read `<path>/config.json` (or a path to the json file itself)."""
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json found at {config_file}")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{config_file} is not valid JSON: {err}") from err
        try:
            return cls.from_dict(raw)
        except ConfigError as err:
            raise ConfigError(f"{config_file}: {err}") from err

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Idefics2Config:
        """Build from a config.json dict in the official or the newer transformers format."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "idefics2")
        _check(model_type == "idefics2", f"model_type is {model_type!r}, expected 'idefics2'")
        text_raw = dict(raw.get("text_config") or {})
        vision_raw = dict(raw.get("vision_config") or {})
        perceiver_raw = dict(raw.get("perceiver_config") or {})

        text = _text_from_dict(text_raw, tie=raw.get("tie_word_embeddings"))
        vision = _dataclass_from_dict(VisionConfig, vision_raw, "vision_config")
        # The official file's perceiver_config holds only `model_type`: the released model's
        # resampler works at the decoder's width with the decoder's RMSNorm eps.
        perceiver_raw.setdefault("hidden_size", text.hidden_size)
        perceiver_raw.setdefault("rms_norm_eps", text.rms_norm_eps)
        perceiver = _dataclass_from_dict(PerceiverConfig, perceiver_raw, "perceiver_config")
        dtype = raw.get("dtype", raw.get("torch_dtype"))
        return cls(
            vision=vision,
            perceiver=perceiver,
            text=text,
            image_token_id=int(raw.get("image_token_id", IMAGE_TOKEN_ID)),
            checkpoint_dtype=str(dtype) if dtype is not None else None,
            quantization=raw.get("quantization"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The newer transformers format (every field explicit), readable by both."""
        text = asdict(self.text)
        text["rope_parameters"] = {"rope_theta": text.pop("rope_theta"), "rope_type": "default"}
        text["model_type"] = "mistral"
        out: dict[str, Any] = {
            "architectures": ["Idefics2ForConditionalGeneration"],
            "model_type": "idefics2",
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": self.text.tie_word_embeddings,
            "use_cache": True,
            "text_config": text,
            "vision_config": {**asdict(self.vision), "model_type": "idefics2_vision"},
            "perceiver_config": {**asdict(self.perceiver), "model_type": "idefics2_perceiver"},
        }
        if self.checkpoint_dtype is not None:
            out["dtype"] = self.checkpoint_dtype
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out

    def save(self, path: str | Path) -> None:
        """Write `<path>/config.json`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _dataclass_from_dict(cls, raw: dict[str, Any], section: str):
    """Keep the keys the dataclass knows (others are training-time or bookkeeping fields)."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            continue
        if isinstance(value, (list, tuple)) and key in ("image_size", "patch_size"):
            _check(len(set(value)) == 1, f"{section}.{key}={value}: only square sizes are supported")
            value = value[0]
        kwargs[key] = _coerce(value, known[key].type, f"{section}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Turn JSON values into the field's type, with an error naming the field."""
    if value is None:
        _check("None" in str(annotation), f"{where} must not be null")
        return None
    kind = str(annotation).split("|")[0].strip()
    try:
        if kind == "int":
            _check(not isinstance(value, bool) and float(value) == int(value), f"{where}={value!r} is not an integer")
            return int(value)
        if kind == "float":
            number = float(value)
            _check(math.isfinite(number), f"{where}={value!r} is not a finite number")
            return number
        if kind == "bool":
            return bool(value)
        if kind == "str":
            return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}={value!r}: {err}") from err
    return value


def _text_from_dict(raw: dict[str, Any], tie: bool | None) -> TextConfig:
    model_type = raw.pop("model_type", "mistral")
    _check(model_type == "mistral", f"text_config.model_type is {model_type!r}, expected 'mistral'")
    rope = raw.pop("rope_parameters", None) or raw.pop("rope_scaling", None)
    if rope is not None:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _check(rope_type == "default", f"text_config rope_type {rope_type!r} is not supported (only 'default')")
        if "rope_theta" in rope:
            raw.setdefault("rope_theta", rope["rope_theta"])
    if raw.get("head_dim") is None:
        hidden = _coerce(raw.get("hidden_size", TextConfig.hidden_size), "int", "text_config.hidden_size")
        heads = _coerce(raw.get("num_attention_heads", TextConfig.num_attention_heads), "int",
                        "text_config.num_attention_heads")
        _check(heads > 0 and hidden % heads == 0,
               f"text_config.hidden_size ({hidden}) must be divisible by num_attention_heads ({heads})")
        raw["head_dim"] = hidden // heads
    if raw.get("num_key_value_heads") is None and "num_attention_heads" in raw:
        raw["num_key_value_heads"] = raw["num_attention_heads"]
    if raw.get("pad_token_id") is None:
        raw["pad_token_id"] = 0  # the official checkpoint pads with <unk> (id 0)
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        raw["eos_token_id"] = eos[0]
    if tie is not None and "tie_word_embeddings" not in raw:
        raw["tie_word_embeddings"] = tie
    # sliding_window is nullable on purpose: null means full causal attention.
    text = _dataclass_from_dict(TextConfig, raw, "text_config")
    return text
