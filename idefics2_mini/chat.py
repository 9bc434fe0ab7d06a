"""A conversation with the model: what the command line's one question and chat do, as a library
(no terminal: text comes in as strings, goes out through a callback).

    options = GenerationOptions(max_new_tokens=64)              # validated here, once
    conversation = Conversation(model, processor, options)
    stats = conversation.ask("What is in this picture?", ["cat.png"], on_text=print)
    stats = conversation.ask("And its colour?", [], on_text=print)   # the KV cache is kept

Turn 1 is the chat template's rendering of the user message (with BOS). A later turn feeds only
what the cache has not seen: the previous answer's last token, the <end_of_utterance> that
closes the answer (when the answer stopped without one), then

    "\\nUser: <text><end_of_utterance>\\nAssistant:"

tokenized on its own. The tokenizer encodes every stretch of text between special tokens
separately, so these ids equal the tail of the whole conversation rendered by the chat template
and tokenized in one go (tests/test_cli.py checks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .generation import SamplingOptions, start_conversation
from .processor import render_chat
from .tokens import END_OF_UTTERANCE_TOKEN_ID, EOS_TOKEN_ID


@dataclass(frozen=True)
class GenerationOptions:
    """What one answer may be: its length, and greedy or sampled (the sampling values are
    checked by generation.SamplingOptions, the one place that knows their rules)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        self.sampling()

    def sampling(self) -> SamplingOptions:
        return SamplingOptions(self.do_sample, self.temperature, self.top_k, self.top_p)


@dataclass
class TurnStats:
    prompt_tokens: int  # tokens fed to the model this turn (after a first turn: only the new ones)
    new_tokens: int
    prefill_seconds: float  # from the start of generate to the first token (vision + prefill)
    decode_seconds: float  # from the first token to the last

    def describe(self) -> str:
        speed = f"{(self.new_tokens - 1) / self.decode_seconds:.1f} tokens/s" if self.new_tokens > 1 and \
            self.decode_seconds > 0 else "n/a"
        return (f"prefill {self.prompt_tokens} tokens {self.prefill_seconds:.3f} s (time to first token) · "
                f"decode {self.new_tokens} tokens {speed}")


def user_message(text: str, num_images: int) -> dict:
    """A chat-template user turn: the images first, then the text."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def first_turn_tokens(processor, text: str, num_images: int) -> int:
    """How many tokens a conversation's first turn is, counted from the text alone (no pixels
    decoded), so that a prompt too long for the model is found before the weights are loaded."""
    prompt = render_chat([user_message(text, num_images)], add_generation_prompt=True)
    return len(processor.tokenizer.encode(processor.expand_image_tokens(prompt), add_bos=True))


def check_first_turn(prompt_tokens: int, max_new_tokens: int, max_positions: int) -> None:
    """ValueError when a first turn and its answer cannot fit the model's positions."""
    if prompt_tokens + max_new_tokens > max_positions:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens; with {max_new_tokens} new tokens that is "
            f"{prompt_tokens + max_new_tokens}, more than the model's maximum of {max_positions} positions "
            "(text_config.max_position_embeddings): shorten the prompt or use fewer/smaller images"
        )


class Conversation:
    """One chat with the model; the KV cache lives across turns (see the module docstring)."""

    def __init__(self, model, processor, options: GenerationOptions, max_total_tokens: int | None = None):
        """max_total_tokens: what all turns together may hold (default: the model's maximum
        positions). The KV cache is bounded by the sliding window whatever this is."""
        self.model = model
        self.processor = processor
        self.options = options
        self.max_total_tokens = max_total_tokens or model.config.text.max_position_embeddings
        self.state = start_conversation(model, self.max_total_tokens)
        self.turns = 0

    user_message = staticmethod(user_message)

    def ask(self, text: str, images: Sequence, on_text: Callable[[str], None]) -> TurnStats:
        """One user turn (`images`: paths or PIL images, before the text) and its answer,
        streamed to `on_text` piece by piece. Returns the turn's timings."""
        return self.answer(self.turn_inputs(text, images), on_text)

    def turn_inputs(self, text: str, images: Sequence) -> dict[str, torch.Tensor]:
        """The model inputs for one user turn: input_ids [1, T] (+ attention_mask, and
        pixel_values / pixel_attention_mask when the turn has images)."""
        message = user_message(text, len(images))
        if self.turns == 0:
            prompt = render_chat([message], add_generation_prompt=True)
            return self.processor(text=prompt, images=list(images) or None)
        batch = self.processor(text="\n" + render_chat([message], add_generation_prompt=True),
                               images=list(images) or None)
        new_ids = batch["input_ids"][:, 1:]  # the processor always starts with BOS; mid-chat there is none
        ids = torch.cat([self._close_previous_answer(), new_ids], dim=1)
        batch["input_ids"], batch["attention_mask"] = ids, torch.ones_like(ids)
        return batch

    def _close_previous_answer(self) -> torch.Tensor:
        """[1, k]: the answer tokens the cache has not seen, ending in <end_of_utterance>.

        The chat template closes every turn with <end_of_utterance>. If the answer ended with it,
        it is already there (not yet in the cache); if it ended with </s>, that token is dropped
        (the template has no </s> there; it was never fed, so the cache is unaffected); if
        max_new_tokens cut it short, one is added."""
        unseen = self.state.unseen[0].tolist()
        if unseen and unseen[-1] == EOS_TOKEN_ID:
            unseen = unseen[:-1]
            self.state.tokens = self.state.tokens[:, :-1]
        if not unseen or unseen[-1] != END_OF_UTTERANCE_TOKEN_ID:
            unseen.append(END_OF_UTTERANCE_TOKEN_ID)
        return torch.tensor([unseen], dtype=torch.long)

    def check_fits(self, batch: dict[str, torch.Tensor]) -> int:
        """ValueError if this turn's prompt cannot fit; returns max_new_tokens for it (fewer
        than asked when the conversation is close to the model's limit)."""
        prompt_tokens = batch["input_ids"].shape[1]
        room = self.max_total_tokens - self.state.cache.num_tokens
        limit = self.model.config.text.max_position_embeddings
        if self.turns == 0:
            check_first_turn(prompt_tokens, self.options.max_new_tokens, min(room, limit))
        if prompt_tokens + 1 > room:
            raise ValueError(
                f"this message is {prompt_tokens} tokens but the conversation has room for only {room} more "
                f"(the model's maximum is {limit} positions): start a new chat"
            )
        return min(self.options.max_new_tokens, room - prompt_tokens)

    def answer(self, batch: dict[str, torch.Tensor], on_text: Callable[[str], None]) -> TurnStats:
        """Generate the answer to `batch` (from `turn_inputs`), calling `on_text` with each
        piece of text as soon as it is final. Returns the turn's timings."""
        from .tokenizer import TextStreamDecoder  # noqa: PLC0415  (sentencepiece)

        max_new_tokens = self.check_fits(batch)
        device = self.model.device
        batch = {name: value.to(device) for name, value in batch.items()}
        decoder = TextStreamDecoder(self.processor.tokenizer, skip_special_tokens=True)
        token_times: list[float] = []

        def stream(token: torch.Tensor) -> None:
            token_times.append(time.perf_counter())
            if piece := decoder.push(int(token[0])):
                on_text(piece)

        start = time.perf_counter()
        self.model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=self.options.do_sample,
            temperature=self.options.temperature, top_k=self.options.top_k, top_p=self.options.top_p,
            seed=self.options.seed, streamer=stream, state=self.state,
        )
        if tail := decoder.flush():
            on_text(tail)
        self.turns += 1
        first, last = (token_times[0], token_times[-1]) if token_times else (start, start)
        return TurnStats(batch["input_ids"].shape[1], len(token_times), first - start, last - first)
