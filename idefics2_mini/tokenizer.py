"""The Idefics2 tokenizer: Mistral-7B-v0.1 SentencePiece plus three added tokens.

Follows SentencePiece (Kudo and Richardson, arXiv:1808.06226) as the released model was trained
with it: the official tokenizer files of HuggingFaceM4/idefics2-8b, read by transformers'
"legacy" Llama tokenizer (the reference in tests/test_tokenizer.py).

Vocabulary (32003 ids; the special tokens' text and ids are in tokens.py):

    0 ... 31999   SentencePiece pieces (0 <unk>, 1 <s>, 2 </s>, 3..258 byte fallback <0x00>..<0xFF>)
    32000         <fake_token_around_image>   wraps each block of image tokens
    32001         <image>                     one slot per perceiver latent (64 per image)
    32002         <end_of_utterance>          ends every chat turn; generation stops on it

How text becomes ids, exactly as the released model was trained (transformers 4.40 with the
official "legacy" tokenizer):

1. the special tokens (the three above and <unk>, <s>, </s>) are cut out of the text;
2. every piece of text between them is encoded by SentencePiece *on its own*, which puts the
   word-start marker "▁" in front of it (SentencePiece's add-dummy-prefix), so
   "<end_of_utterance>\\nAssistant:" -> [32002, 28705 "▁", 13 "\\n", 7226 "▁Ass", 11143 "istant", 28747 ":"];
3. <s> (id 1) goes in front when `add_bos=True`; no </s> at the end.

Newer transformers tokenizers do *not* add the "▁" after a special token (they give
[32002, 13, ...] above); the model never saw that, so we keep the trained behaviour.

Decoding is the inverse: ordinary ids are decoded by SentencePiece run by run (which drops the
"▁" a run starts with), special ids are written as their text or skipped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece

from .tokens import (
    BOS_TOKEN,
    END_OF_UTTERANCE_TOKEN,
    END_OF_UTTERANCE_TOKEN_ID,
    EOS_TOKEN,
    FAKE_IMAGE_TOKEN,
    FAKE_IMAGE_TOKEN_ID,
    IMAGE_TOKEN,
    IMAGE_TOKEN_ID,
    SENTENCEPIECE_VOCAB_SIZE,
    UNK_TOKEN,
    VOCAB_SIZE,
)

# The tokenizer shipped with the package (Apache-2.0, see weights/TOKENIZER_LICENSE.md).
SHIPPED_TOKENIZER_MODEL = Path(__file__).resolve().parents[1] / "weights" / "tokenizer.model"


class Idefics2Tokenizer:
    """SentencePiece + the three Idefics2 tokens, with the trained (legacy) segmentation.

    Attributes: `bos_token_id` 1, `eos_token_id` 2, `unk_token_id` 0, `pad_token_id` 0,
    `fake_image_token_id` 32000, `image_token_id` 32001, `end_of_utterance_token_id` 32002,
    `vocab_size` 32003.
    """

    bos_token = BOS_TOKEN
    eos_token = EOS_TOKEN
    unk_token = UNK_TOKEN
    pad_token = UNK_TOKEN  # Idefics2 pads with id 0 (<unk>); the attention mask hides it.
    fake_image_token = FAKE_IMAGE_TOKEN
    image_token = IMAGE_TOKEN
    end_of_utterance_token = END_OF_UTTERANCE_TOKEN

    def __init__(self, model_file: str | Path = SHIPPED_TOKENIZER_MODEL):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(
                f"SentencePiece model not found: {model_file}. Expected the Mistral-7B-v0.1 "
                f"tokenizer.model (shipped at {SHIPPED_TOKENIZER_MODEL})."
            )
        self.model_file = model_file
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        base_size = self.sp.get_piece_size()
        if base_size != SENTENCEPIECE_VOCAB_SIZE:
            raise ValueError(
                f"{model_file} has {base_size} pieces; Idefics2 needs the 32000-piece Mistral-7B-v0.1 "
                "SentencePiece model (its added tokens start at id 32000)."
            )

        self.unk_token_id = self.sp.unk_id()
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.unk_token_id
        self.fake_image_token_id = FAKE_IMAGE_TOKEN_ID
        self.image_token_id = IMAGE_TOKEN_ID
        self.end_of_utterance_token_id = END_OF_UTTERANCE_TOKEN_ID
        self.vocab_size = VOCAB_SIZE

        # Every token that is cut out of the text and never handed to SentencePiece.
        self.special_token_to_id: dict[str, int] = {
            self.unk_token: self.unk_token_id,
            self.bos_token: self.bos_token_id,
            self.eos_token: self.eos_token_id,
            FAKE_IMAGE_TOKEN: self.fake_image_token_id,
            IMAGE_TOKEN: self.image_token_id,
            END_OF_UTTERANCE_TOKEN: self.end_of_utterance_token_id,
        }
        self.id_to_special_token = {i: t for t, i in self.special_token_to_id.items()}
        # Longest first so a token is never cut short by another that is its prefix.
        alternatives = sorted(self.special_token_to_id, key=len, reverse=True)
        self._special_token_pattern = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    @classmethod
    def from_pretrained(cls, directory: str | Path | None = None) -> "Idefics2Tokenizer":
        """Use `directory/tokenizer.model` when it exists, else the tokenizer shipped in weights/."""
        if directory is not None:
            candidate = Path(directory) / "tokenizer.model"
            if candidate.is_file():
                return cls(candidate)
            if not Path(directory).is_dir():
                raise FileNotFoundError(f"Not a directory: {directory}")
        return cls(SHIPPED_TOKENIZER_MODEL)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self.id_to_special_token)

    # ------------------------------------------------------------------ encoding

    def split_special_tokens(self, text: str) -> list[str]:
        """Cut `text` into alternating ordinary text and special tokens (empty pieces dropped)."""
        return [part for part in self._special_token_pattern.split(text) if part]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids, the way the released model was trained (see the module docstring)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_bos else []
        for part in self.split_special_tokens(text):
            special_id = self.special_token_to_id.get(part)
            if special_id is not None:
                ids.append(special_id)
            else:
                # SentencePiece adds the "▁" word-start marker in front of every segment.
                ids.extend(self.sp.encode(part))
        return ids

    def __call__(self, text: str | Sequence[str], add_bos: bool = True) -> list[int] | list[list[int]]:
        if isinstance(text, str):
            return self.encode(text, add_bos=add_bos)
        return [self.encode(t, add_bos=add_bos) for t in text]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        def one(token: str) -> int:
            if token in self.special_token_to_id:
                return self.special_token_to_id[token]
            return self.sp.piece_to_id(token)

        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        def one(token_id: int) -> str:
            self._check_id(token_id)
            return self.id_to_special_token.get(token_id) or self.sp.id_to_piece(token_id)

        if hasattr(ids, "tolist"):  # tensors and numpy values
            ids = ids.tolist()
        return one(ids) if isinstance(ids, int) else [one(int(i)) for i in ids]

    # ------------------------------------------------------------------ decoding

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text. Accepts a list of ints or a 1-D tensor.

        Runs of ordinary ids are decoded by SentencePiece (bytes from byte-fallback pieces are
        joined into UTF-8, the leading "▁" of a run becomes nothing); special ids are written as
        their text, or dropped with `skip_special_tokens=True` (then the ordinary ids around
        them are decoded as one run).
        """
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            self._check_id(token_id)
            special = self.id_to_special_token.get(token_id)
            if special is None:
                run.append(token_id)
            elif not skip_special_tokens:
                pieces.append(self.sp.decode(run))
                pieces.append(special)
                run = []
        pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """Decode each row of a list of id lists or of a 2-D tensor [B, T]."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]


class TextStreamDecoder:
    """Turns ids arriving one at a time into text that is safe to print straight away.

    `push(ids)` returns only the text that became final with these ids; the pieces returned
    over a whole stream, plus `flush()`, concatenate to exactly
    `tokenizer.decode(all_ids, skip_special_tokens)`. Text is held back while it ends in an
    incomplete UTF-8 character (byte-fallback tokens such as <0xF0><0x9F><0x9A><0x80> arrive one
    byte at a time and decode to U+FFFD until the last one is there).
    """

    def __init__(self, tokenizer: Idefics2Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._finished_text = ""  # text of the runs closed by a special token
        self._run: list[int] = []  # ordinary ids since the last special token
        self._emitted = 0  # characters of (finished + current run) already returned

    def _current_text(self) -> str:
        return self._finished_text + self.tokenizer.sp.decode(self._run)

    def push(self, ids: int | Iterable[int]) -> str:
        """Feed one id or several; returns the newly completed text ("" if none)."""
        if isinstance(ids, int) or (hasattr(ids, "dim") and ids.dim() == 0):
            ids = [int(ids)]
        for token_id in (ids.tolist() if hasattr(ids, "tolist") else ids):
            token_id = int(token_id)
            self.tokenizer._check_id(token_id)
            special = self.tokenizer.id_to_special_token.get(token_id)
            if special is None:
                self._run.append(token_id)
            elif not self.skip_special_tokens:
                # A special token closes the run: its text can no longer change.
                self._finished_text = self._current_text() + special
                self._run = []
        text = self._current_text()
        # An unfinished multi-byte character decodes to U+FFFD; wait for its remaining bytes.
        stable_end = len(text)
        while stable_end > self._emitted and text[stable_end - 1] == "\ufffd":
            stable_end -= 1
        new_text = text[self._emitted : stable_end]
        self._emitted = max(self._emitted, stable_end)
        return new_text

    def flush(self) -> str:
        """End of stream: return whatever is still held back (e.g. a dangling partial byte)."""
        text = self._current_text()
        new_text = text[self._emitted :]
        self._emitted = len(text)
        return new_text
