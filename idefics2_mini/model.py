"""Idefics2: vision tower -> connector -> image tokens spliced into the decoder's input.

Follows Laurençon et al., "What matters when building vision-language models?" (2024,
arXiv:2405.02246) and the released HuggingFaceM4/idefics2-8b; the reference implementation is
transformers' `Idefics2ForConditionalGeneration`.

    pixel_values [B, N, 3, H, W] ─ drop all-zero padding images ─► [I, 3, H, W]
        ─► vision (patch mask from pixel mask) ─► [I, L, 1152]
        ─► connector ─► image features [I, 64, 4096]
    input_ids [B, T] ─► embeddings; the 64·I rows at <image> tokens ← image features, in order
        ─► text decoder ─► lm_head ─► logits [B, T, vocab]
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .backends.cpu import use_cpu_linears, use_cpu_norms
from .cache import KVCache
from .config import Idefics2Config
from .connector import Connector
from .generation import GenerationDefaults, generate
from .loading import load_weights
from .loss import IGNORE_INDEX, cross_entropy, shift_labels
from .packing import PackedImages, pack_images, pack_padded
from .text import TextDecoder
from .vision import VisionTransformer, patch_mask_from_pixel_mask, patch_token_grid

# What `forward(output_attentions=...)` can return: True means all three.
ATTENTION_PARTS = ("vision", "perceiver", "text")


class InputError(ValueError):
    """Inputs that do not fit the model (shapes, image token counts, lengths)."""


@dataclass
class Idefics2Output:
    """What `forward` returns with `labels` (training), `output_hidden_states=True` or
    `output_attentions=...` (research).

    Attention probabilities (softmax(q·kᵀ/√d + mask), the reference's eager layout and order;
    probabilities of padding queries and keys are zero). L = the images' padded patch count
    (R·C of the largest patch grid), token l of an image = patch (l // C, l % C): `patch_grid`."""

    logits: torch.Tensor | None  # [B, T, vocab]; None after forward(labels=..., keep_logits=False)
    text_hidden_states: list[torch.Tensor] = field(default_factory=list)  # layers + 1 of [B, T, C]
    vision_hidden_states: list[torch.Tensor] = field(default_factory=list)  # layers + 1 of [I, L, 1152]
    image_features: torch.Tensor | None = None  # [I, 64, C], connector output
    loss: torch.Tensor | None = None  # scalar, with labels: see loss.py
    vision_attentions: list[torch.Tensor] = field(default_factory=list)  # layers of [I, heads, L, L]
    # layers of [I, heads, 64, L + 64]: keys are the image's L patches, then the 64 latents
    perceiver_attentions: list[torch.Tensor] = field(default_factory=list)
    # layers of [B, heads, T, K]: K = every token so far (T, or the cache's tokens + T)
    text_attentions: list[torch.Tensor] = field(default_factory=list)
    patch_grid: torch.Tensor | None = None  # [I, R, C] long: token l of patch (r, c) of image i; -1 = padding
    # [I, 2] long: (sample b, slot n in pixel_values[b]) of image i. With image splitting slot n is
    # crop n % 5 (top-left, top-right, bottom-left, bottom-right, whole) of the sample's image n // 5.
    image_index: torch.Tensor | None = None


class Idefics2(nn.Module):
    def __init__(self, config: Idefics2Config):
        super().__init__()
        self.config = config
        self.vision = VisionTransformer(config.vision)
        self.connector = Connector(config)
        self.text = TextDecoder(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.text.embed_tokens.weight
        # How the vision tower runs images of different sizes (see get_image_features).
        self.image_layout = "auto"
        # Stop tokens and banned tokens for generate (replaced by generation_config.json on load).
        self.generation_defaults = GenerationDefaults.for_config(config)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        *,
        mmap: bool | None = None,
        progress=None,
        backends: bool = True,
        quantize=None,
    ) -> Idefics2:
        """Load an official-layout checkpoint folder: config.json, the safetensors weights
        (mapped or copied, strictly checked: see `loading.load_weights` for `mmap` and
        `progress`), generation_config.json. Parameters come back frozen (requires_grad=False)
        for inference; `model.requires_grad_(True)` to train.

        `backends=True` applies the inference speed-ups of idefics2_mini/backends (fused
        projections, CPU linears); they step aside whenever a gradient is wanted. False gives
        the plain model.

        A weight-only quantized checkpoint (config.json has a `quantization` block) loads
        quantized; `quantize="int8" | "int4"` (or an idefics2_mini.quantize.QuantSpec)
        quantizes a float checkpoint while loading it, streaming (idefics2_mini/quantize/)."""
        path = Path(path)
        config = Idefics2Config.from_pretrained(path)
        with torch.device("meta"):  # no memory and no init: every parameter comes from the file
            model = cls(config)
        if quantize is not None or config.quantization is not None:
            from .quantize.checkpoint import load_quantized  # noqa: PLC0415

            load_quantized(model, path, dtype, device, quantize, progress=progress, fuse=backends)
        else:
            load_weights(model, path, dtype, device, progress=progress, mmap=mmap, fuse=backends)
        # Non-persistent buffers (RoPE frequencies) are recomputed, not loaded.
        model.text.rotary = type(model.text.rotary)(config.text.head_dim, config.text.rope_theta).to(device)
        model.generation_defaults = GenerationDefaults.from_pretrained(path, config)
        if backends:
            use_cpu_linears(model)
            use_cpu_norms(model)
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        # The embedding's: never quantized (a quantized lm_head has no float weight).
        return self.text.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text.embed_tokens.weight.device

    # ------------------------------------------------------------------ images
    def get_image_features(
        self,
        pixel_values: torch.Tensor | PackedImages | Sequence[Sequence[torch.Tensor]],
        pixel_attention_mask: torch.Tensor | None = None,
        vision_hidden_states_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Image features [I, n_latents, C] of the I real images, in batch order, from either form:

        - padded (the reference's): pixel_values [B, N, 3, H, W] (or [N, 3, H, W]) with
          pixel_attention_mask [B, N, H, W] (None = all real); all-zero images are padding;
        - packed: a `PackedImages`, or per-sample lists of unpadded [3, h, w] image tensors.

        `self.image_layout` picks how the vision tower runs: "packed" (no padded patch is ever
        computed), "padded", or "auto" (default): packed whenever some patch is padding — the
        images differ in size — since then it does strictly less work; padded otherwise, where
        both do the same work and batched attention needs no gathers.
        """
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = pack_images(pixel_values, self.config.vision.patch_size)
        if isinstance(pixel_values, PackedImages):
            return self._packed_image_features(pixel_values.to(self.device, self.dtype), vision_hidden_states_out)
        images, patch_mask, is_real = self._real_images(pixel_values, pixel_attention_mask)
        if images.shape[0] == 0:
            return images.new_zeros(0, self.config.image_seq_len, self.config.text.hidden_size)
        batch, slots = is_real.shape
        if self.image_layout not in ("auto", "packed", "padded"):
            raise ValueError(f"image_layout must be 'auto', 'packed' or 'padded', got {self.image_layout!r}")
        if self.image_layout == "packed" or (self.image_layout == "auto" and not bool(patch_mask.all())):
            images_per_sample = is_real.view(batch, slots).sum(dim=1).tolist()
            packed = pack_padded(images, patch_mask, images_per_sample, self.config.vision.patch_size)
            if packed is not None:
                return self._packed_image_features(packed, vision_hidden_states_out)
        vision_features = self.vision(images, patch_mask, vision_hidden_states_out)
        return self.connector(vision_features, patch_mask.flatten(1))

    def _packed_image_features(self, packed: PackedImages, vision_hidden_states_out=None) -> torch.Tensor:
        vision_features = self.vision.forward_packed(packed, vision_hidden_states_out)
        return self.connector.forward_packed(vision_features, packed)

    def _real_images(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None):
        """Padded pixel inputs [B, N, 3, H, W] (or [N, 3, H, W]) + mask -> the real images
        [I, 3, H, W] (model dtype), their patch mask [I, H//p, W//p] bool and is_real [B, N]."""
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[None]
            pixel_attention_mask = None if pixel_attention_mask is None else pixel_attention_mask[None]
        _check_pixel_inputs(pixel_values, pixel_attention_mask, self.config.vision.num_channels)
        batch, slots, _, height, width = pixel_values.shape
        images = pixel_values.reshape(-1, *pixel_values.shape[2:]).to(self.dtype)
        # Samples with fewer images are padded with all-zero images; a real image never is
        # all zero after normalisation (black is -1), so this is how the reference drops them.
        is_real = (images != 0).flatten(1).any(dim=1)
        images = images[is_real]
        if pixel_attention_mask is None:
            pixel_mask = torch.ones(images.shape[0], height, width, dtype=torch.bool, device=images.device)
        else:
            pixel_mask = pixel_attention_mask.reshape(-1, height, width).to(images.device)[is_real]
        patch_mask = patch_mask_from_pixel_mask(pixel_mask, self.config.vision.patch_size)
        if not bool(patch_mask.flatten(1).any(dim=1).all()):
            raise InputError(
                "an image has no complete patch: its pixel_attention_mask covers less than "
                f"{self.config.vision.patch_size}x{self.config.vision.patch_size} pixels"
            )
        return images, patch_mask, is_real.view(batch, slots)

    def _image_features_with_attentions(self, pixel_values, pixel_attention_mask, parts, vision_hidden_states_out):
        """`get_image_features` for `output_attentions`: always the padded layout (one patch grid
        per image, as the reference), attention written out in the parts asked for.
        -> (features [I, n_latents, C], vision attentions, perceiver attentions, patch_grid, image_index)."""
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = pack_images(pixel_values, self.config.vision.patch_size)
        if isinstance(pixel_values, PackedImages):
            packed = pixel_values.to(self.device, self.dtype)
            images, patch_mask = packed.to_padded()
            image_index = torch.tensor(
                [(b, n) for b, count in enumerate(packed.images_per_sample) for n in range(count)], dtype=torch.long
            ).view(-1, 2)
        else:
            images, patch_mask, is_real = self._real_images(pixel_values, pixel_attention_mask)
            image_index = is_real.nonzero().cpu()  # row-major: the images' batch order
        vision_attentions = [] if "vision" in parts else None
        perceiver_attentions = [] if "perceiver" in parts else None
        features = images.new_zeros(0, self.config.image_seq_len, self.config.text.hidden_size)
        if images.shape[0]:
            vision_features = self.vision(images, patch_mask, vision_hidden_states_out, vision_attentions)
            features = self.connector(vision_features, patch_mask.flatten(1), perceiver_attentions)
        return (features, vision_attentions or [], perceiver_attentions or [], patch_token_grid(patch_mask),
                image_index)

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B, T], image_features [I, n_latents, C] -> embeddings [B, T, C] with the
        <image> rows replaced by the image features, in reading order."""
        embeddings = self.text.embed_tokens(input_ids)
        image_positions = input_ids == self.config.image_token_id
        num_image_tokens = int(image_positions.sum())
        num_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if num_image_tokens != num_features:
            num_images = 0 if image_features is None else image_features.shape[0]
            raise InputError(
                f"the prompt has {num_image_tokens} <image> tokens (id {self.config.image_token_id}) but "
                f"{num_images} image(s) were given, which need {num_features} "
                f"({self.config.image_seq_len} per image); use the processor to expand each <image>"
            )
        if num_features:
            embeddings = embeddings.masked_scatter(
                image_positions[..., None], image_features.to(embeddings.dtype).reshape(-1, embeddings.shape[-1])
            )
        return embeddings

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | Collection[str] = False,
        last_token_only: bool = False,
        labels: torch.Tensor | None = None,
        num_counted: int | torch.Tensor | None = None,
        keep_logits: bool = True,
    ) -> torch.Tensor | Idefics2Output:
        """input_ids [B, T] long; attention_mask [B, T] (1 = real, 0 = left padding);
        pixel_values [B, N, 3, H, W]; pixel_attention_mask [B, N, H, W].

        Returns logits [B, T, vocab] (or [B, 1, vocab] with `last_token_only`), or an
        `Idefics2Output` with per-layer hidden states and image features when
        `output_hidden_states=True`. `image_features` (from `get_image_features`) may be passed
        instead of pixels; `cache` continues a KV cache (see generation.py and `decode_step`).

        Research: `output_attentions=True` also returns every layer's attention probabilities
        (vision, perceiver, decoder: see `Idefics2Output`), computed by attention written out as
        math (`layers.eager_attention`) in the layers asked for; images then run in the padded
        layout. A subset such as `output_attentions=("perceiver", "text")` skips the vision
        tower's maps, which are large: 27 layers x 16 heads x L² floats per image (L = 4900 at 980²).

        Training: with `labels` [B, T] (-100 = not counted; see `Idefics2Processor.training_batch`)
        the output also carries `.loss`, the next-token cross-entropy of loss.py (`num_counted`
        overrides its divisor, for gradient accumulation). `keep_logits=False` runs the lm_head
        only on the positions whose target counts and returns `.logits = None`: the [B, T, vocab]
        logits and their gradient are the largest activations of a training step.
        """
        _check_text_inputs(input_ids, attention_mask, self.config)
        if cache is None and input_ids.shape[1] > self.config.text.max_position_embeddings:
            raise InputError(
                f"the prompt has {input_ids.shape[1]} tokens but the model allows at most "
                f"{self.config.text.max_position_embeddings} (text_config.max_position_embeddings)"
            )
        parts = _attention_parts(output_attentions)
        maps = Idefics2Output(None) if parts else None  # collects the attention probabilities asked for
        vision_hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        if pixel_values is not None and not _is_empty_image_list(pixel_values):
            if image_features is not None:
                raise InputError("pass either pixel_values or image_features, not both")
            if "vision" in parts or "perceiver" in parts:
                (image_features, maps.vision_attentions, maps.perceiver_attentions, maps.patch_grid,
                 maps.image_index) = self._image_features_with_attentions(
                    pixel_values, pixel_attention_mask, parts, vision_hidden_states)
            else:
                image_features = self.get_image_features(pixel_values, pixel_attention_mask, vision_hidden_states)
        embeddings = self.embed_inputs(input_ids, image_features)
        text_hidden_states: list[torch.Tensor] | None = [] if output_hidden_states else None
        text_attentions = maps.text_attentions if "text" in parts else None  # (parts is empty: maps is None)
        hidden = self.text(embeddings, attention_mask, cache, text_hidden_states, text_attentions)
        if labels is not None:
            if tuple(labels.shape) != tuple(input_ids.shape):
                raise InputError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
            targets = shift_labels(labels.to(input_ids.device))
            if keep_logits:
                logits = self.lm_head(hidden)
                loss = cross_entropy(logits.flatten(0, 1), targets.flatten(), num_counted)
            else:
                counted = targets != IGNORE_INDEX
                logits, loss = None, cross_entropy(self.lm_head(hidden[counted]), targets[counted], num_counted)
            return Idefics2Output(logits, text_hidden_states or [], vision_hidden_states or [], image_features, loss,
                                  **_attention_fields(maps))
        if last_token_only:
            hidden = hidden[:, -1:]
        logits = self.lm_head(hidden)
        if not output_hidden_states and not parts:
            return logits
        return Idefics2Output(logits, text_hidden_states or [], vision_hidden_states or [], image_features,
                              **_attention_fields(maps))

    def decode_step(self, token_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One generated token per row through the cache: token_ids [B, 1] -> logits [B, vocab].

        The hot loop of generation, so it skips `forward`'s input checks (their min/max would
        be a device sync per token) and image splicing (a generated <image> is just a token)."""
        positions = cache.begin_step(1)
        cos, sin = self.text.rotary(positions, cache.num_tokens + 1, self.dtype)
        logits = self.decode_logits(token_ids, cos, sin, cache)
        cache.end_step()
        return logits

    def decode_logits(self, token_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache):
        """The tensor work of a decode step, between the cache's begin_step and end_step:
        token_ids [B, 1], cos/sin [B, 1, 1, D] -> logits [B, vocab]. It reads no host-side
        counters (the cache keeps the step's slot in tensors), so it compiles to one graph
        (backends/compiled.py)."""
        hidden = self.text.run_layers(self.text.embed_tokens(token_ids), cos, sin, None, cache)
        return self.lm_head(hidden[:, -1])

    def generate(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None, **options):
        """-> LongTensor [B, T + new]; see `idefics2_mini.generation.generate` for the options."""
        return generate(self, input_ids, attention_mask, pixel_values, pixel_attention_mask, **options)

    def new_cache(self, batch_size: int, max_tokens: int) -> KVCache:
        """An empty KV cache for `batch_size` rows and at most `max_tokens` tokens per row."""
        text = self.config.text
        if max_tokens > text.max_position_embeddings:
            raise InputError(
                f"{max_tokens} tokens (prompt + new) exceed the model's maximum of "
                f"{text.max_position_embeddings} positions (text_config.max_position_embeddings)"
            )
        # The attention modules' own kv head count: a tensor-parallel rank holds a slice of the
        # heads (distributed.py), and its cache only those.
        return KVCache(
            num_layers=text.num_hidden_layers, batch_size=batch_size,
            num_kv_heads=self.text.layers[0].self_attn.num_kv_heads,
            head_dim=text.head_dim, max_tokens=max_tokens, sliding_window=text.sliding_window,
            dtype=self.dtype, device=self.device,
        )


def _check_text_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: Idefics2Config) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputError(f"input_ids must be a [batch, tokens] tensor, got {_describe(input_ids)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise InputError("input_ids is empty (0 tokens)")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.text.vocab_size):
        raise InputError(
            f"input_ids holds ids outside [0, {config.text.vocab_size}): "
            f"min {int(input_ids.min())}, max {int(input_ids.max())}"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
        )


def _check_pixel_inputs(pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None, channels: int) -> None:
    if pixel_values.dim() != 5 or pixel_values.shape[2] != channels:
        raise InputError(
            f"pixel_values must be [batch, images, {channels}, height, width], got {_describe(pixel_values)}"
        )
    if pixel_attention_mask is not None:
        expected = (*pixel_values.shape[:2], *pixel_values.shape[3:])
        if tuple(pixel_attention_mask.shape) != tuple(expected):
            raise InputError(
                f"pixel_attention_mask must be [batch, images, height, width] = {list(expected)}, "
                f"got {list(pixel_attention_mask.shape)}"
            )


def _attention_parts(output_attentions: bool | Collection[str]) -> frozenset[str]:
    """forward's `output_attentions` -> the set of ATTENTION_PARTS asked for."""
    if isinstance(output_attentions, bool):
        return frozenset(ATTENTION_PARTS if output_attentions else ())
    parts = frozenset([output_attentions] if isinstance(output_attentions, str) else output_attentions)
    if not parts <= set(ATTENTION_PARTS):
        raise ValueError(f"output_attentions: unknown part(s) {sorted(parts - set(ATTENTION_PARTS))}; "
                         f"give True or a subset of {ATTENTION_PARTS}")
    return parts


def _attention_fields(maps: Idefics2Output | None) -> dict:
    if maps is None:
        return {}
    return {name: getattr(maps, name) for name in (
        "vision_attentions", "perceiver_attentions", "text_attentions", "patch_grid", "image_index")}


def _is_empty_image_list(pixel_values) -> bool:
    return isinstance(pixel_values, (list, tuple)) and not any(len(sample) for sample in pixel_values)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"
