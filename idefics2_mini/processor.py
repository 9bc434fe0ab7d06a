"""Chat messages + images -> the model's input tensors.

    messages ──apply_chat_template──► "User:<image>What is this?<end_of_utterance>\\nAssistant:"
    prompt + images ──__call__──► input_ids [B, T], attention_mask [B, T],
                                  pixel_values [B, N, 3, H, W], pixel_attention_mask [B, N, H, W]

In the prompt each `<image>` is expanded to the slots the connector fills with 64 image
embeddings:

    <fake_token_around_image> <image>×64 <fake_token_around_image>

(five such blocks, sharing their boundary tokens, when image splitting is on), and two images
side by side share their middle <fake_token_around_image>. Sequences are left-padded with id 0
so that the last position of every row is the prompt's last token (what generation continues).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from .image_processing import Idefics2ImageProcessor, ImageLike
from .loss import IGNORE_INDEX
from .tokenizer import Idefics2Tokenizer
from .tokens import END_OF_UTTERANCE_TOKEN, FAKE_IMAGE_TOKEN, IMAGE_TOKEN

CHAT_ROLES = ("user", "assistant", "system")


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The official Idefics2 chat template, written out in Python (see `render_turns`)."""
    rendered = [head + body + "\n" for _, head, body in render_turns(messages)]
    if add_generation_prompt:
        rendered.append("Assistant:")
    return "".join(rendered)


def render_turns(messages: Sequence[dict]) -> list[tuple[str, str, str]]:
    """Each turn of the official Idefics2 chat template as (role, head, body); the template is
    the concatenation of head + body + "\n" over the turns.

    Each turn is `Role:` + content + `<end_of_utterance>\\n`, where Role is the capitalized role
    and the colon is followed by a space unless the turn starts with an image. Content is a
    list of {"type": "text", "text": ...} / {"type": "image"} items, or a plain string (taken
    as one text item). The generation prompt is `Assistant:`.

    Like the official template, a bare string *inside* a content list is not rendered (a
    warning says so): use {"type": "text", "text": ...} for text in a list.

    head is `Role:` plus its separator; body is the content and the closing `<end_of_utterance>`
    (what training counts in an assistant turn).
    """
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r:.100}")
        role = message["role"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{index}]: unknown role {role!r}; expected one of {CHAT_ROLES}")
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)) or len(content) == 0:
            raise ValueError(
                f"messages[{index}]: content must be a non-empty list of items or a string, got {content!r:.100}"
            )

        parts = []
        for item_index, item in enumerate(content):
            where = f"messages[{index}]['content'][{item_index}]"
            if isinstance(item, str):
                warnings.warn(
                    f"{where} is a bare string; the Idefics2 chat template skips it. "
                    "Write {'type': 'text', 'text': ...} to include it.",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a dict with a 'type', got {type(item).__name__}")
            item_type = item.get("type")
            if item_type == "text":
                if not isinstance(item.get("text"), str):
                    raise ValueError(f"{where}: a text item needs a string 'text', got {item.get('text')!r:.100}")
                parts.append(item["text"])
            elif item_type == "image":
                parts.append(IMAGE_TOKEN)
            else:
                raise ValueError(f"{where}: unknown content type {item_type!r}; expected 'text' or 'image'")

        starts_with_image = isinstance(content[0], dict) and content[0].get("type") == "image"
        separator = ":" if starts_with_image else ": "
        turns.append((role, role.capitalize() + separator, "".join(parts) + END_OF_UTTERANCE_TOKEN))
    return turns


class Idefics2Processor:
    """Tokenizer + image processor + chat template; see the module docstring.

    `processor(text=..., images=...)` returns a dict of torch tensors with the reference
    processor's names, shapes and dtypes (int64 ids and masks, float32 pixels).
    """

    def __init__(
        self,
        tokenizer: Idefics2Tokenizer | None = None,
        image_processor: Idefics2ImageProcessor | None = None,
        image_seq_len: int = 64,
    ):
        self.tokenizer = tokenizer if tokenizer is not None else Idefics2Tokenizer()
        self.image_processor = image_processor if image_processor is not None else Idefics2ImageProcessor()
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
        self.image_seq_len = image_seq_len
        self.image_token = IMAGE_TOKEN
        self.fake_image_token = FAKE_IMAGE_TOKEN
        self.end_of_utterance_token = END_OF_UTTERANCE_TOKEN

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None, **image_options) -> "Idefics2Processor":
        """Build from a checkpoint folder: `tokenizer.model` (else the shipped one),
        `preprocessor_config.json` and `processor_config.json` when present (else the official
        defaults). `image_options` (e.g. do_image_splitting=True) override the file."""
        image_seq_len = 64
        if directory is not None:
            if not Path(directory).is_dir():
                raise FileNotFoundError(f"Not a directory: {directory}")
            processor_config = Path(directory) / "processor_config.json"
            if processor_config.is_file():
                image_seq_len = int(json.loads(processor_config.read_text()).get("image_seq_len", image_seq_len))
        return cls(
            tokenizer=Idefics2Tokenizer.from_pretrained(directory),
            image_processor=Idefics2ImageProcessor.from_pretrained(directory, **image_options),
            image_seq_len=image_seq_len,
        )

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """Render one conversation as a prompt string (see `render_chat`)."""
        return render_chat(messages, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ prompts

    def expand_image_tokens(self, prompt: str) -> str:
        """Replace each <image> by its fake-token-wrapped block(s) of `image_seq_len` <image>s."""
        block = FAKE_IMAGE_TOKEN + IMAGE_TOKEN * self.image_seq_len
        blocks_per_image = 5 if self.image_processor.do_image_splitting else 1
        expanded = prompt.replace(IMAGE_TOKEN, block * blocks_per_image + FAKE_IMAGE_TOKEN)
        # Adjacent images share the fake token between them.
        # No space is inserted after the closing fake token (newer transformers do that): the
        # trained tokenizer already starts every text segment with the "▁" word marker.
        return expanded.replace(FAKE_IMAGE_TOKEN + FAKE_IMAGE_TOKEN, FAKE_IMAGE_TOKEN)

    def _images_per_prompt(self, prompts: list[str], images: Any) -> list[list[ImageLike]]:
        """Match images to prompts: a flat list is dealt out in order by each prompt's <image>
        count; a list of lists must have one list per prompt with the right count."""
        counts = [prompt.count(IMAGE_TOKEN) for prompt in prompts]
        if images is None:
            if sum(counts) > 0:
                raise ValueError(
                    f"The prompts have {sum(counts)} {IMAGE_TOKEN} token(s) (per prompt: {counts}) but no images were given"
                )
            return [[] for _ in prompts]
        nested = Idefics2ImageProcessor.as_nested_image_list(images)  # also validates the structure
        looks_flat = not (isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)))
        if looks_flat:
            flat = nested[0]
            if len(flat) != sum(counts):
                raise ValueError(
                    f"The prompts have {sum(counts)} {IMAGE_TOKEN} token(s) (per prompt: {counts}) but "
                    f"{len(flat)} image(s) were given"
                )
            per_prompt, start = [], 0
            for count in counts:
                per_prompt.append(flat[start : start + count])
                start += count
            return per_prompt
        if len(nested) != len(prompts):
            raise ValueError(f"Got {len(nested)} lists of images for {len(prompts)} prompts; give one list per prompt")
        given = [len(sample) for sample in nested]
        if given != counts:
            raise ValueError(
                f"The number of {IMAGE_TOKEN} tokens per prompt {counts} does not match the number of "
                f"images per prompt {given}"
            )
        return nested

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        packed: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Tokenize prompts (with BOS, image tokens expanded) and process their images.

        Returns input_ids [B, T] int64 and attention_mask [B, T] int64 (left padding with id 0)
        when `text` is given, and pixel_values [B, N, 3, H, W] float32 and pixel_attention_mask
        [B, N, H, W] int64 when images are given. With text, the number of <image> tokens must
        equal the number of images (per prompt for a list of lists). With `packed=True` the
        images come back as one `PackedImages` in pixel_values (no padding, no pixel mask).
        """
        if text is None and images is None:
            raise ValueError("Give text, images, or both")
        if text is None:
            return self.image_processor(images, packed=packed)

        prompts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r:.100}")

        images_per_prompt = self._images_per_prompt(prompts, images)
        token_ids = [self.tokenizer.encode(self.expand_image_tokens(p), add_bos=True) for p in prompts]
        batch = self._left_pad(token_ids)
        if any(images_per_prompt):
            batch.update(self.image_processor(images_per_prompt, packed=packed))
        return batch

    def _left_pad(self, token_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Lists of ids -> input_ids [B, T] and attention_mask [B, T] (int64, pads on the left)."""
        length = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), length), self.tokenizer.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(token_ids), length), dtype=torch.int64)
        for row, ids in enumerate(token_ids):
            if ids:
                input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
                attention_mask[row, length - len(ids) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ training

    def tokenize_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """One conversation -> (token ids, counted): the ids of `self(text=render_chat(messages))`
        (BOS first, every <image> expanded) and, per token, whether training counts it.

        The labels rule: only what the assistant says is learned — the text of each assistant
        turn and its closing `<end_of_utterance>`. The `Assistant:` head, every user/system turn,
        the newlines between turns, BOS, and all `<image>` / `<fake_token_around_image>` tokens
        (even inside an assistant turn) are not counted.
        """
        spans: list[tuple[int, int]] = []  # [start, end) character ranges that count
        pieces = []
        length = 0
        for role, head, body in render_turns(messages):
            body = self.expand_image_tokens(body)
            if role == "assistant":
                spans.append((length + len(head), length + len(head) + len(body)))
            pieces.append(head + body + "\n")
            length += len(pieces[-1])
        text = "".join(pieces)

        def counts(position: int) -> bool:
            return any(start <= position < end for start, end in spans)

        tokenizer = self.tokenizer
        ids, counted = [tokenizer.bos_token_id], [False]
        not_learned = {tokenizer.image_token_id, tokenizer.fake_image_token_id}
        position = 0
        for part in tokenizer.split_special_tokens(text):
            special_id = tokenizer.special_token_to_id.get(part)
            if special_id is not None:
                ids.append(special_id)
                counted.append(counts(position) and special_id not in not_learned)
            else:
                part_ids = tokenizer.sp.encode(part)  # exactly what tokenizer.encode does per segment
                flags = [counts(position)] * len(part_ids)
                # Where counting starts inside this segment ("Assistant: The..." -> at " The"),
                # the tokens of the text before that point are the uncounted ones.
                for start, _ in spans:
                    if position < start < position + len(part):
                        before = tokenizer.sp.encode(part[: start - position])
                        shared = 0
                        while shared < min(len(before), len(part_ids)) and before[shared] == part_ids[shared]:
                            shared += 1
                        flags[shared:] = [True] * (len(part_ids) - shared)
                ids.extend(part_ids)
                counted.extend(flags)
            position += len(part)
        return ids, counted

    def training_batch(
        self,
        conversations: Sequence[Sequence[dict]],
        images: Sequence[Sequence[ImageLike]] | None = None,
        max_length: int | None = None,
        packed: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Conversations (each a chat, see `render_chat`) and their images (one list per
        conversation, in order of appearance) -> the model's inputs plus `labels` [B, T] int64:
        the token id where `tokenize_chat` counts the token, -100 elsewhere (padding included).
        Left padding, like `__call__`. Raises ValueError naming the conversation when one is
        longer than `max_length` tokens or has no assistant turn to learn from."""
        if isinstance(conversations, (str, dict)) or not conversations:
            raise ValueError("conversations must be a non-empty list of chats (each a list of messages)")
        token_ids, all_labels = [], []
        for index, messages in enumerate(conversations):
            ids, counted = self.tokenize_chat(messages)
            if not any(counted):
                raise ValueError(f"conversation {index} has no assistant turn: there is nothing to learn from it")
            if max_length is not None and len(ids) > max_length:
                raise ValueError(
                    f"conversation {index} is {len(ids)} tokens long (images expanded), more than max_length "
                    f"{max_length}: shorten it or raise max_length"
                )
            token_ids.append(ids)
            all_labels.append([i if c else IGNORE_INDEX for i, c in zip(ids, counted)])
        prompts = [render_chat(messages) for messages in conversations]
        if images is not None and all(isinstance(i, (list, tuple)) and not i for i in images):
            images = None  # text-only conversations (or a count mismatch, reported as such below)
        images_per_prompt = self._images_per_prompt(prompts, images)
        batch = self._left_pad(token_ids)
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, row_labels in enumerate(all_labels):
            labels[row, labels.shape[1] - len(row_labels) :] = torch.tensor(row_labels, dtype=torch.int64)
        batch["labels"] = labels
        if any(images_per_prompt):
            batch.update(self.image_processor(images_per_prompt, packed=packed))
        return batch

    # ------------------------------------------------------------------ decoding

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)
