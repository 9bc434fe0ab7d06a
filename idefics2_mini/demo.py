"""The embedded default checkpoint: a tiny random-weight Idefics2 in the official file layout.

Without the official weights the command line still runs the whole pipeline (image loading,
processor, vision tower, connector, decoder, KV cache, streaming) on this checkpoint, so a fresh
checkout answers the README command in seconds. Its answers are noise: the weights are random.

Where checkpoints live (`weights_root()`, default `<repo>/weights`, or $IDEFICS2_MINI_WEIGHTS_DIR):

    weights/idefics2-8b/   the official HuggingFaceM4/idefics2-8b download (see weights/README.md)
    weights/demo-tiny/     built here on first use: config.json, model.safetensors,
                           generation_config.json, tokenizer.model (a copy of weights/tokenizer.model)

The demo keeps every *shape rule* of the real model that the pipeline depends on and shrinks
only the widths and depths:
- vision image_size 980, patch 14 -> the 70x70 position table, so real images up to 980x980;
- 64 perceiver latents -> the processor's 64 <image> tokens per image fit;
- vocab 32003 -> the real tokenizer and its three added tokens;
- max positions 32768 and sliding window 4096, like Mistral-7B.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import Idefics2Config, PerceiverConfig, TextConfig, VisionConfig
from .tokenizer import SHIPPED_TOKENIZER_MODEL
from .tokens import BOS_TOKEN_ID, END_OF_UTTERANCE_TOKEN_ID, EOS_TOKEN_ID, FAKE_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID

WEIGHTS_DIR_ENV = "IDEFICS2_MINI_WEIGHTS_DIR"
DEFAULT_WEIGHTS_ROOT = Path(__file__).resolve().parents[1] / "weights"
OFFICIAL_DIRNAME = "idefics2-8b"
DEMO_DIRNAME = "demo-tiny"
DEMO_SEED = 20240415  # fixed: the demo checkpoint is the same bytes on every machine and run

# What the official generation_config.json says about stopping and banned tokens.
DEMO_GENERATION_CONFIG = {
    "bad_words_ids": [[FAKE_IMAGE_TOKEN_ID], [IMAGE_TOKEN_ID]],  # never generated
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": [EOS_TOKEN_ID, END_OF_UTTERANCE_TOKEN_ID],
    "pad_token_id": PAD_TOKEN_ID,
}

NOISE_NOTICE = (
    "note: this is the tiny demo checkpoint with RANDOM weights ({path}); its answer is noise.\n"
    "      For real answers download HuggingFaceM4/idefics2-8b into {official} "
    "(see weights/README.md), or pass --weights DIR."
)


def weights_root() -> Path:
    """The folder that holds `idefics2-8b/` and `demo-tiny/` ($IDEFICS2_MINI_WEIGHTS_DIR overrides)."""
    override = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(override) if override else DEFAULT_WEIGHTS_ROOT


def demo_config() -> Idefics2Config:
    """Tiny widths, 1-2 layers, every shape rule of the real model (see the module docstring)."""
    return Idefics2Config(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            image_size=980, patch_size=14),
        perceiver=PerceiverConfig(hidden_size=32, resampler_n_latents=64, resampler_depth=1, resampler_n_heads=2,
                                  resampler_head_dim=16, num_key_value_heads=1),
        text=TextConfig(vocab_size=32003, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                        max_position_embeddings=32768, sliding_window=4096),
        checkpoint_dtype="float32",
    )


def random_demo_model(config: Idefics2Config | None = None, seed: int = DEMO_SEED):
    """The demo model with weights drawn from a private generator: deterministic, and it neither
    reads nor advances the global RNG (whatever the caller seeded stays as it was)."""
    from .model import Idefics2  # noqa: PLC0415  (kept local: model imports are the slow part)

    config = config or demo_config()
    with torch.device("meta"):  # no default init: every value is written below
        model = Idefics2(config)
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        value = torch.empty(param.shape, dtype=torch.float32)
        if name.endswith(".bias"):
            value.zero_()
        elif param.dim() == 1:  # LayerNorm / RMSNorm scales
            value.fill_(1.0)
        else:
            # Wide enough that the random logits are not all near-ties (the noise varies).
            value.normal_(0.0, 0.5, generator=generator)
        _set_parameter(model, name, torch.nn.Parameter(value, requires_grad=False))
    if config.text.tie_word_embeddings:
        model.lm_head.weight = model.text.embed_tokens.weight
    model.text.rotary = type(model.text.rotary)(config.text.head_dim, config.text.rope_theta)
    return model.eval()


def _set_parameter(model: torch.nn.Module, name: str, value: torch.nn.Parameter) -> None:
    module_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(module_name), attribute, value)


def build_checkpoint(path: str | Path, config: Idefics2Config | None = None, seed: int = DEMO_SEED) -> Path:
    """Write a random-weight checkpoint in the official layout to `path`, atomically.

    Everything is written into a temporary sibling folder that is renamed to `path` only when
    complete, so an interrupted build leaves no `path` behind (only a `.tmp-*` folder, removed
    by the next build). If `path` already exists it is replaced. Returns `path`.
    """
    from .loading import save_checkpoint  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published checkpoint is an ordinary folder
    try:
        save_checkpoint(random_demo_model(config, seed), staging)
        (staging / "generation_config.json").write_text(json.dumps(DEMO_GENERATION_CONFIG, indent=2) + "\n")
        shutil.copyfile(SHIPPED_TOKENIZER_MODEL, staging / "tokenizer.model")
        _publish(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _publish(staging: Path, path: Path) -> None:
    """Rename `staging` to `path`; an existing `path` is moved aside first and then deleted.
    rename() of a folder is atomic: readers see either the old checkpoint or the new one."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    try:
        staging.rename(path)
    except OSError:
        # Another process published first (rename onto a non-empty folder fails): use theirs.
        if not (path / "config.json").is_file():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_builds(path: Path) -> None:
    """Delete `.{name}.tmp-PID-*` folders left by builds whose process is gone."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(leftover.name.split(".tmp-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _process_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def demo_is_current(path: str | Path) -> bool:
    """True when `path` holds a finished demo checkpoint built from today's `demo_config()`
    (a checkpoint from an older version of this file is rebuilt, not silently reused)."""
    path = Path(path)
    try:
        on_disk = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    expected = json.loads(json.dumps(demo_config().to_dict()))
    files = ("model.safetensors", "generation_config.json", "tokenizer.model")
    return on_disk == expected and all((path / name).is_file() for name in files)


def ensure_demo_checkpoint(root: str | Path | None = None) -> tuple[Path, bool]:
    """The demo checkpoint folder under `root` (default `weights_root()`), built if missing or
    out of date. Returns (folder, whether it was built just now)."""
    path = Path(root if root is not None else weights_root()) / DEMO_DIRNAME
    if demo_is_current(path):
        return path, False
    return build_checkpoint(path), True

