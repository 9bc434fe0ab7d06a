"""Tiny random Idefics2 checkpoints written by the reference implementation (transformers),
for parity tests. Every tensor is random — norm weights, latents and the position table too —
so that a wrong cast, a swapped norm or a missing bias cannot hide behind ones and zeros."""

from __future__ import annotations

import math

import torch

VOCAB = 32003


def reference_tokenizer():
    """The reference (newer transformers) tokenizer built locally, no download: vocab + merges
    read from the shipped SentencePiece model, the three Idefics2 tokens added."""
    import sentencepiece
    import transformers
    from transformers.tokenization_utils_base import generate_merges

    from idefics2_mini.tokenizer import SHIPPED_TOKENIZER_MODEL

    sp = sentencepiece.SentencePieceProcessor(model_file=str(SHIPPED_TOKENIZER_MODEL))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tokenizer = transformers.LlamaTokenizer(
        vocab=vocab, merges=generate_merges(vocab), add_bos_token=True, add_eos_token=False, pad_token="<unk>"
    )
    added = [
        transformers.AddedToken(t, normalized=False, special=True)
        for t in ("<fake_token_around_image>", "<image>", "<end_of_utterance>")
    ]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    return tokenizer


def tiny_config_dict(
    *,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_head_dim: int = 24,
    sliding_window: int | None = 16,
    vision_hidden: int = 36,
    vision_heads: int = 3,
    image_size: int = 56,
    patch_size: int = 14,
    perceiver_heads: int = 4,
    perceiver_kv_heads: int = 2,
    perceiver_head_dim: int = 12,
    n_latents: int = 4,
    text_layers: int = 2,
    vision_layers: int = 2,
    perceiver_depth: int = 2,
    max_positions: int = 512,
) -> dict:
    text_hidden = text_heads * text_head_dim
    return dict(
        image_token_id=32001,
        tie_word_embeddings=False,
        vision_config=dict(
            hidden_size=vision_hidden, intermediate_size=2 * vision_hidden + 4, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size, layer_norm_eps=1e-6,
        ),
        perceiver_config=dict(
            hidden_size=text_hidden, rms_norm_eps=1e-5, resampler_n_latents=n_latents, resampler_depth=perceiver_depth,
            resampler_n_heads=perceiver_heads, resampler_head_dim=perceiver_head_dim,
            num_key_value_heads=perceiver_kv_heads,
        ),
        text_config=dict(
            model_type="mistral", vocab_size=VOCAB, hidden_size=text_hidden, intermediate_size=2 * text_hidden + 8,
            num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
            head_dim=text_head_dim, sliding_window=sliding_window, rms_norm_eps=1e-5,
            max_position_embeddings=max_positions, pad_token_id=0, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        ),
    )


def randomize_(model: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    """Fill every parameter with seeded random values of a sensible size."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.dim() >= 2:
                fan_in = math.prod(param.shape[1:])
                std = scale / math.sqrt(fan_in)
                if "embed_tokens" in name or "position_embedding" in name or "latents" in name:
                    std = 1.0
                param.copy_(torch.randn(param.shape, generator=generator) * std)
            elif name.endswith("weight"):  # norm weights
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            else:  # biases
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def make_reference_checkpoint(path, seed: int = 0, scale: float = 1.0, **config_kwargs):
    """Build a random transformers Idefics2ForConditionalGeneration, save it to `path` with
    save_pretrained (official tensor names) and return it (eval mode, fp32, eager attention)."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    config = Idefics2Config(**tiny_config_dict(**config_kwargs))
    torch.manual_seed(seed)
    reference = Idefics2ForConditionalGeneration(config).eval()
    randomize_(reference, seed, scale)
    reference.save_pretrained(path)
    reference.config._attn_implementation = "eager"
    for module in reference.modules():
        if hasattr(module, "config") and hasattr(module.config, "_attn_implementation"):
            module.config._attn_implementation = "eager"
    return reference


def reference_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """The position ids the reference's generate derives from a left-padded attention mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def image_prompt_ids(
    text_ids_before: list[int], num_images: int, n_latents: int, text_ids_after: list[int]
) -> list[int]:
    """<fake><image>*n<fake> per image between two text pieces (the processor's expansion)."""
    ids = list(text_ids_before)
    for _ in range(num_images):
        ids += [32000] + [32001] * n_latents
    ids += [32000] if num_images else []
    return ids + list(text_ids_after)
