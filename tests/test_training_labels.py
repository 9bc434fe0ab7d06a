"""The labels rule of `Idefics2Processor.tokenize_chat` / `training_batch`: only the assistant's
text and its <end_of_utterance> count; user and system turns, role heads, newlines, BOS,
<image> / <fake_token_around_image> tokens (even inside an assistant turn) and padding are -100."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import idefics2_mini as im
from idefics2_mini.image_processing import Idefics2ImageProcessor
from idefics2_mini.processor import render_chat

IMAGES = Path(__file__).parent / "data" / "images"

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]},
    {"role": "assistant", "content": "A cat, asleep."},
    {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
    {"role": "assistant", "content": [
        {"type": "text", "text": "A cup of coffee, like this one:"}, {"type": "image"}, {"type": "text", "text": " hot."},
    ]},
]


@pytest.fixture(scope="module")
def processor():
    return im.Idefics2Processor(
        image_processor=Idefics2ImageProcessor(longest_edge=56, shortest_edge=28), image_seq_len=3
    )


def test_ids_are_the_processors_ids(processor):
    ids, counted = processor.tokenize_chat(CHAT)
    assert ids == processor.tokenizer.encode(processor.expand_image_tokens(render_chat(CHAT)))
    assert len(counted) == len(ids)


def test_only_assistant_text_and_end_of_utterance_count(processor):
    tokenizer = processor.tokenizer
    ids, counted = processor.tokenize_chat(CHAT)
    learned = [i for i, c in zip(ids, counted) if c]
    # Each assistant turn's text (the image in the second one is not learned) and its
    # <end_of_utterance>; " hot." after the image is its own segment: "▁" + "▁hot", two spaces.
    assert tokenizer.decode(learned) == (
        "A cat, asleep.<end_of_utterance>A cup of coffee, like this one:  hot.<end_of_utterance>"
    )
    assert learned.count(tokenizer.end_of_utterance_token_id) == 2
    assert tokenizer.image_token_id not in learned and tokenizer.fake_image_token_id not in learned
    # Everything else is not learned: system and user turns, heads, BOS, newlines.
    ignored = tokenizer.decode([i for i, c in zip(ids, counted) if not c])
    for text in ("Answer briefly.", "What animal is this?", "And here?", "User:", "Assistant:", "System:"):
        assert text in ignored
    assert not counted[0]  # BOS


def test_training_batch_labels_and_padding(processor):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    batch = processor.training_batch(
        [CHAT, short], [[IMAGES / "chelsea.png", IMAGES / "coffee.png", IMAGES / "rocket.jpg"], []]
    )
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert labels.shape == input_ids.shape and labels.dtype == torch.int64
    assert (labels[mask == 0] == -100).all()  # padding (left)
    counted = labels != -100
    assert (labels[counted] == input_ids[counted]).all()
    ids, flags = processor.tokenize_chat(short)
    row = labels[1, -len(ids):].tolist()
    assert row == [i if f else -100 for i, f in zip(ids, flags)]
    assert processor.tokenizer.decode(labels[1][labels[1] != -100].tolist()) == "Hello.<end_of_utterance>"
    assert batch["pixel_values"].shape[:2] == (2, 3)


def test_bad_conversations_are_named(processor):
    no_answer = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="conversation 1 has no assistant turn"):
        processor.training_batch([CHAT[:3], no_answer], [[IMAGES / "chelsea.png"], []])
    with pytest.raises(ValueError, match=r"conversation 0 is \d+ tokens long .* max_length 10"):
        processor.training_batch([CHAT[:3]], [[IMAGES / "chelsea.png"]], max_length=10)
    with pytest.raises(ValueError, match="1 <image> token.* no images"):
        processor.training_batch([CHAT[:3]], [[]])
