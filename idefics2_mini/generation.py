"""Token generation: prefill once (images included), then one token per step from the KV cache.

    logits = model(prompt, images, cache)          # prefill: vision + connector run here, once
    repeat: pick next token (greedy or sampled) -> model(next token, cache) -> logits

Per step the loop does the decoder forward, the token choice and one host sync (the stop
check). Sequences that finished keep receiving the pad token until all have finished, like the
reference's `generate`. Sampling filters in the reference's order: temperature, then top-k (Fan
et al., arXiv:1805.04833), then top-p (nucleus sampling, Holtzman et al., arXiv:1904.09751).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .backends.cpu import greedy_argmax
from .config import Idefics2Config
from .tokens import END_OF_UTTERANCE_TOKEN_ID, EOS_TOKEN_ID, FAKE_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID


@dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint's generation_config.json says about stopping and banned tokens."""

    eos_token_ids: tuple[int, ...] = (EOS_TOKEN_ID, END_OF_UTTERANCE_TOKEN_ID)
    # The image placeholders must never be generated (the official bad_words_ids).
    bad_words_ids: tuple[tuple[int, ...], ...] = ((FAKE_IMAGE_TOKEN_ID,), (IMAGE_TOKEN_ID,))
    pad_token_id: int = PAD_TOKEN_ID

    @classmethod
    def for_config(cls, config: Idefics2Config) -> GenerationDefaults:
        vocab = config.text.vocab_size
        eos = tuple(t for t in (config.text.eos_token_id, END_OF_UTTERANCE_TOKEN_ID) if t < vocab)
        bad = tuple((t,) for t in (FAKE_IMAGE_TOKEN_ID, IMAGE_TOKEN_ID) if t < vocab)
        return cls(eos_token_ids=eos, bad_words_ids=bad, pad_token_id=config.text.pad_token_id)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: Idefics2Config) -> GenerationDefaults:
        """Read `<path>/generation_config.json` when present; missing fields keep the defaults."""
        defaults = cls.for_config(config)
        file = Path(path) / "generation_config.json"
        if not file.is_file():
            return defaults
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON: {err}") from err
        eos = raw.get("eos_token_id", defaults.eos_token_ids)
        eos = (eos,) if isinstance(eos, int) else tuple(eos or ())
        bad = raw.get("bad_words_ids") or defaults.bad_words_ids
        pad = raw.get("pad_token_id")
        return cls(
            eos_token_ids=tuple(int(t) for t in eos),
            bad_words_ids=tuple(tuple(int(t) for t in words) for words in bad),
            pad_token_id=defaults.pad_token_id if pad is None else int(pad),
        )


@dataclass
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def choose_next_token(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [B, vocab] (bans already applied) -> next token ids [B].

    Sampling filters in the reference's order: temperature, then top-k, then top-p.
    """
    if not options.do_sample:
        return greedy_argmax(logits)  # = logits.argmax(-1), vectorised on the CPU
    scores = logits.float() / options.temperature
    if options.top_k is not None and options.top_k < scores.shape[-1]:
        kth_best = scores.topk(options.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if options.top_p is not None and options.top_p < 1.0:
        # Keep the smallest set of tokens whose probability mass reaches top_p (at least one).
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= (1 - options.top_p)
        drop_sorted[:, -1] = False
        scores = scores.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


class BannedTokens:
    """Tokens `generate` must not emit (bad_words_ids): single tokens are banned outright, by
    an index tensor built once; a longer sequence bans its last token after its prefix."""

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], device: torch.device):
        self.single = torch.tensor([w[0] for w in bad_words_ids if len(w) == 1], dtype=torch.long, device=device)
        self.sequences = [(torch.tensor(w[:-1], device=device), w[-1]) for w in bad_words_ids if len(w) > 1]

    def apply_(self, logits: torch.Tensor, history: Callable[[], torch.Tensor]) -> None:
        """In place on logits [B, vocab]; history() -> [B, n] tokens so far (asked for only
        when a multi-token sequence is banned)."""
        if self.single.numel():
            logits.index_fill_(1, self.single, float("-inf"))
        if not self.sequences:
            return
        tokens = history()
        for prefix, last in self.sequences:
            if tokens.shape[1] >= prefix.shape[0]:
                hit = (tokens[:, tokens.shape[1] - prefix.shape[0] :] == prefix).all(dim=1)
                logits[hit, last] = float("-inf")


TokenCallback = Callable[[torch.Tensor], None]


@dataclass
class GenerationState:
    """What a conversation keeps between turns: the KV cache and every token so far."""

    cache: object  # KVCache
    tokens: torch.Tensor  # [B, n] prompt and answer tokens of all turns so far

    @property
    def unseen(self) -> torch.Tensor:
        """[B, k] tokens not yet in the cache (the last answer token); feed them first next turn."""
        return self.tokens[:, self.cache.num_tokens :]


@dataclass
class GenerateOutput:
    """What `generate(..., output_attentions=...)` returns: the tokens and each model call's
    attention probabilities (see `Idefics2Output`). steps[0] is the prompt's forward (vision,
    perceiver and decoder maps, text [B, heads, T, T]); steps[s] for s >= 1 is the decode step
    that produced new token s: its text_attentions are [B, heads, 1, T + s] per layer, over
    every token so far (keys outside the sliding window zero)."""

    sequences: torch.Tensor  # [B, T + new], as generate returns without attentions
    steps: list  # of Idefics2Output, one per model call (len = number of new tokens)


def start_conversation(model, max_total_tokens: int, batch_size: int = 1) -> GenerationState:
    """A conversation whose turns together hold at most `max_total_tokens` tokens."""
    cache = model.new_cache(batch_size, max_total_tokens)
    return GenerationState(cache=cache, tokens=torch.zeros(batch_size, 0, dtype=torch.long, device=model.device))


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    bad_words_ids: Sequence[Sequence[int]] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer: TokenCallback | None = None,
    state: GenerationState | None = None,
    output_attentions: bool | Sequence[str] = False,
) -> torch.Tensor | GenerateOutput:
    """Generate up to `max_new_tokens` tokens after the prompt.

    input_ids [B, T] (left-padded), attention_mask [B, T], pixel_values [B, N, 3, H, W],
    pixel_attention_mask [B, N, H, W] -> LongTensor [B, T + new] (the prompt, then the new tokens;
    rows that stopped early are filled with the pad token).

    eos_token_id / bad_words_ids / pad_token_id default to the checkpoint's generation_config.json
    (</s> and <end_of_utterance> stop; the image placeholders are never generated). Sampling is
    reproducible with `seed` (or a `generator`). `streamer(token_ids [B])` is called with every new
    step's tokens. To continue a conversation, pass the same `state` (from `start_conversation`)
    on every turn: the prompt is then the tokens the cache has not seen yet (see
    `GenerationState.unseen`) plus the new turn, and the cache keeps everything before it.

    `output_attentions` (True, or parts as in `Idefics2.forward`) returns a `GenerateOutput`
    with every step's attention probabilities; those steps run through `model.forward` with the
    attention written out instead of `decode_step` (the same cache, the same tokens).
    """
    options = SamplingOptions(do_sample, temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    defaults: GenerationDefaults = getattr(model, "generation_defaults", None) or GenerationDefaults.for_config(
        model.config
    )
    eos_ids = defaults.eos_token_ids if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    )
    bad_words = defaults.bad_words_ids if bad_words_ids is None else tuple(tuple(w) for w in bad_words_ids)
    pad_id = defaults.pad_token_id if pad_token_id is None else pad_token_id
    if generator is None and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    batch, prompt_len = input_ids.shape
    input_ids = input_ids.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    max_positions = model.config.text.max_position_embeddings
    if state is None:
        if prompt_len + max_new_tokens > max_positions:
            raise ValueError(
                f"the prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens}"
                f" exceeds the model's maximum of {max_positions} positions (text_config.max_position_embeddings)"
            )
        state = start_conversation(model, prompt_len + max_new_tokens, batch)
    elif state.cache.num_tokens + prompt_len + max_new_tokens > state.cache.max_tokens:
        raise ValueError(
            f"this conversation would reach {state.cache.num_tokens + prompt_len + max_new_tokens} tokens, "
            f"more than the {state.cache.max_tokens} it was started with"
        )

    eos = torch.tensor(eos_ids, dtype=torch.long, device=model.device)
    history = torch.cat([state.tokens[:, : state.cache.num_tokens], input_ids], dim=1)  # what the cache will hold
    steps = []  # with output_attentions: each model call's Idefics2Output
    logits = model(
        input_ids, attention_mask, pixel_values, pixel_attention_mask, cache=state.cache, last_token_only=True,
        **({"output_attentions": output_attentions} if output_attentions else {}),
    )
    if output_attentions:
        steps.append(logits)
        logits = logits.logits
    logits = logits[:, -1]
    new_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=model.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=model.device)
    banned = BannedTokens(bad_words, model.device)
    pad = torch.full((batch,), pad_id, dtype=torch.long, device=model.device)
    num_finished = 0  # rows that have stopped (a host int: the one sync per step)
    for step in range(max_new_tokens):
        banned.apply_(logits, lambda: torch.cat([history, new_tokens[:, :step]], dim=1))
        next_token = choose_next_token(logits, options, generator)
        if num_finished:
            next_token = torch.where(finished, pad, next_token)
        new_tokens[:, step] = next_token
        if streamer is not None:
            streamer(next_token)
        finished |= torch.isin(next_token, eos)
        num_finished = int(finished.sum())
        if step == max_new_tokens - 1 or num_finished == batch:
            new_tokens = new_tokens[:, : step + 1]
            break
        if output_attentions:
            steps.append(model(next_token[:, None], cache=state.cache, last_token_only=True,
                               output_attentions=output_attentions))
            logits = steps[-1].logits[:, -1]
        else:
            logits = model.decode_step(next_token[:, None], state.cache)
    # The last token chosen is not in the cache yet; a next turn starts by feeding it.
    state.tokens = torch.cat([history, new_tokens], dim=1)
    sequences = torch.cat([input_ids, new_tokens], dim=1)
    return GenerateOutput(sequences, steps) if output_attentions else sequences


def stream_text(model, tokenizer, batch: dict[str, torch.Tensor], **generate_kwargs) -> Iterator[str]:
    """Yield the text of a one-row generation piece by piece, as its tokens arrive.

    `generate` runs in a worker thread and hands each token over a queue; decoding is
    incremental and holds back incomplete UTF-8 (byte-fallback tokens), so a piece never ends
    inside a multi-byte character. Joined, the pieces equal the decoded answer.
    """
    from .tokenizer import TextStreamDecoder  # noqa: PLC0415  (tokenizer needs sentencepiece)

    if batch["input_ids"].shape[0] != 1:
        raise ValueError(f"stream_text streams one sequence; got a batch of {batch['input_ids'].shape[0]}")
    decoder = TextStreamDecoder(tokenizer, skip_special_tokens=True)
    channel: queue.Queue[str | None] = queue.Queue()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate(model, **batch, streamer=lambda token: channel.put(decoder.push(int(token[0]))), **generate_kwargs)
        except BaseException as err:  # noqa: BLE001  (re-raised in the consumer's thread)
            errors.append(err)
        finally:
            channel.put(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while (piece := channel.get()) is not None:
        if piece:
            yield piece
    worker.join()
    if errors:
        raise errors[0]
    if tail := decoder.flush():
        yield tail
