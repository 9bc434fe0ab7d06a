"""Tokenizer: the trained (legacy) segmentation, parity with the reference on ordinary text,
decoding and the streaming decoder."""

import hashlib
import random
from pathlib import Path

import pytest
import torch
from reference_models import reference_tokenizer as build_reference_tokenizer

from idefics2_mini.tokenizer import SHIPPED_TOKENIZER_MODEL, Idefics2Tokenizer, TextStreamDecoder

ORDINARY_TEXTS = [
    "Hello world",
    "What do these images show?",
    "The first image shows the statue of Liberty in New York.",
    "In this image, we see a cat sitting on a sofa.\nIt looks relaxed.",
    "Prices rose 3.5% in 2023 (from $1,200 to $1,242); see p. 17.",
    "Unicode: café, naïve, Ærøskøbing, 日本語のテキスト, Привет, 🚀🐈",
    "Tabs\tand\nnewlines\r\nmixed",
    "Question: is it?\nAnswer: yes.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Idefics2Tokenizer()


@pytest.fixture(scope="module")
def reference_tokenizer():
    """The reference (newer transformers) tokenizer built locally from the same SentencePiece
    model: vocab + merges read with sentencepiece, the three Idefics2 tokens added."""
    pytest.importorskip("transformers")
    return build_reference_tokenizer()


def test_shipped_model_and_special_ids(tokenizer):
    digest = hashlib.sha256(SHIPPED_TOKENIZER_MODEL.read_bytes()).hexdigest()
    assert digest == "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id) == (1, 2, 0, 0)
    assert tokenizer.fake_image_token_id == 32000
    assert tokenizer.image_token_id == 32001
    assert tokenizer.end_of_utterance_token_id == 32002
    assert len(tokenizer) == tokenizer.vocab_size == 32003
    assert tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<end_of_utterance>"]) == [
        32000,
        32001,
        32002,
    ]
    assert tokenizer.convert_ids_to_tokens([1, 32001, 22557]) == ["<s>", "<image>", "▁Hello"]


def test_ordinary_text_matches_reference(tokenizer, reference_tokenizer):
    for text in ORDINARY_TEXTS:
        ours = tokenizer.encode(text)
        assert ours[0] == 1 and ours[-1] != 2  # BOS, no EOS
        assert ours == reference_tokenizer(text)["input_ids"], text
        assert tokenizer.encode(text, add_bos=False) == reference_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_trained_ids_after_special_tokens(tokenizer, reference_tokenizer):
    """The released model saw a "▁" (28705) at the start of every text segment, also right after
    a special token; the newer reference tokenizer drops it there."""
    text = "<end_of_utterance>\nAssistant:"
    trained = [32002, 28705, 13, 7226, 11143, 28747]
    assert tokenizer.encode(text, add_bos=False) == trained
    newer = reference_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert newer == [32002, 13, 7226, 11143, 28747]
    assert newer != trained
    assert tokenizer.encode("<image>And", add_bos=False) == [32001, 1015]  # "▁And"
    assert reference_tokenizer("<image>And", add_special_tokens=False)["input_ids"] == [32001, 2467]  # "And"


def test_chat_prompt_equals_reference_run_segment_by_segment(tokenizer, reference_tokenizer):
    """Trained behaviour = the reference tokenizer applied to each text segment on its own."""
    prompt = (
        "User: What do these images show?<image><image><end_of_utterance>\n"
        "Assistant: A statue and a dog.<end_of_utterance>\n"
        "User:<image>And who is that?<end_of_utterance>\nAssistant:"
    )
    expected = [1]
    for part in tokenizer.split_special_tokens(prompt):
        if part in tokenizer.special_token_to_id:
            expected.append(tokenizer.special_token_to_id[part])
        else:
            expected.extend(reference_tokenizer(part, add_special_tokens=False)["input_ids"])
    ours = tokenizer.encode(prompt)
    assert ours == expected
    # Run on the whole prompt at once, the newer tokenizer differs right after special tokens.
    assert reference_tokenizer(prompt)["input_ids"] != ours


def test_every_segment_gets_the_word_marker(tokenizer):
    # "What" after a special token is "▁What" (1824), as in training; never bare "What" (3195).
    assert tokenizer.encode("<image>What", add_bos=False) == [32001, 1824]
    assert tokenizer.encode("x<fake_token_around_image>What", add_bos=False) == [1318, 32000, 1824]
    # All special tokens are cut out of the text, including <s> and </s>.
    assert tokenizer.encode("Hi</s><s>", add_bos=False) == [15359, 2, 1]
    assert tokenizer.encode("", add_bos=True) == [1]


def test_whitespace_runs_follow_sentencepiece(tokenizer, reference_tokenizer):
    """Known divergence: for runs of several spaces we follow SentencePiece (which splits
    before each space); the tokenizers-library BPE of the reference merges "▁▁" instead."""
    assert tokenizer.encode("a  b", add_bos=False) == tokenizer.sp.encode("a  b") == [264, 28705, 287]
    assert reference_tokenizer("a  b", add_special_tokens=False)["input_ids"] == [264, 259, 28726]
    code = "def f(x):\n    return x"
    assert tokenizer.encode(code) == [1] + tokenizer.sp.encode(code)
    assert tokenizer.encode(code) != reference_tokenizer(code)["input_ids"]


def test_decode_round_trip_and_skip_special(tokenizer):
    prompt = "User:<image>What is this?<end_of_utterance>\nAssistant: A cat 🐈.<end_of_utterance>\n"
    ids = tokenizer.encode(prompt)
    assert tokenizer.decode(ids) == "<s>" + prompt
    assert tokenizer.decode(torch.tensor(ids)) == "<s>" + prompt
    assert tokenizer.decode(ids, skip_special_tokens=True) == "User: What is this? \nAssistant: A cat 🐈. \n"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([32003])


def test_batch_decode_matches_reference_on_generated_text(tokenizer, reference_tokenizer):
    rows = [tokenizer.encode(t, add_bos=False) + [32002] for t in ORDINARY_TEXTS[:6]]
    width = max(map(len, rows))
    padded = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding, like generate output
    ours = tokenizer.batch_decode(padded, skip_special_tokens=True)
    assert ours == reference_tokenizer.batch_decode(padded.tolist(), skip_special_tokens=True)
    assert ours == ORDINARY_TEXTS[:6]


def test_stream_decoder_handles_split_utf8_and_leading_space(tokenizer):
    ids = tokenizer.encode("Rocket 𝔘 launch: 日本 🐈", add_bos=False)
    assert any(3 <= i < 259 for i in ids)  # 𝔘 is spelled with byte-fallback tokens
    stream = TextStreamDecoder(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "Rocket 𝔘 launch: 日本 🐈"
    assert all("\ufffd" not in piece for piece in pieces)  # never prints half a character
    assert pieces[:2] == ["R", "ocket"]  # the first word's "▁" is not printed as a space


def test_stream_decoder_equals_decode_on_random_streams(tokenizer):
    text = "User: Ça va? 🐈‍⬛ Größe 30€ — ok.<end_of_utterance>\nAssistant: Oui, très bien! 😀"
    ids = tokenizer.encode(text)
    rng = random.Random(0)
    for skip in (True, False):
        stream = TextStreamDecoder(tokenizer, skip_special_tokens=skip)
        out, position = [], 0
        while position < len(ids):
            step = rng.randint(1, 3)
            out.append(stream.push(ids[position : position + step]))
            position += step
        out.append(stream.flush())
        assert "".join(out) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_from_pretrained(tmp_path):
    assert Idefics2Tokenizer.from_pretrained(tmp_path).model_file == SHIPPED_TOKENIZER_MODEL  # fallback
    (tmp_path / "tokenizer.model").write_bytes(SHIPPED_TOKENIZER_MODEL.read_bytes())
    assert Idefics2Tokenizer.from_pretrained(tmp_path).model_file == tmp_path / "tokenizer.model"
    with pytest.raises(FileNotFoundError):
        Idefics2Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        Idefics2Tokenizer(Path(tmp_path) / "none.model")
