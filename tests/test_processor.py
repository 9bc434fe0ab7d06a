"""Processor: chat template, <image> expansion, batching, parity with the reference processor,
and clear errors on bad prompts."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from reference_models import reference_tokenizer

from idefics2_mini.image_processing import Idefics2ImageProcessor
from idefics2_mini.processor import Idefics2Processor
from idefics2_mini.tokenizer import SHIPPED_TOKENIZER_MODEL

IMAGES = Path(__file__).parent / "data" / "images"
FAKE, IMAGE, EOU = 32000, 32001, 32002

# The chat template published with HuggingFaceM4/idefics2-8b (processor_config.json).
OFFICIAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def open_rgb(name: str) -> PIL.Image.Image:
    image = PIL.Image.open(IMAGES / name)
    image.load()
    return image


def reference_processor(do_image_splitting: bool = False):
    """The reference Idefics2Processor, built locally (no download) from the shipped tokenizer."""
    transformers = pytest.importorskip("transformers")
    tokenizer = reference_tokenizer()
    image_processor = transformers.Idefics2ImageProcessorPil(do_image_splitting=do_image_splitting)
    return transformers.Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=64, chat_template=OFFICIAL_CHAT_TEMPLATE
    )


@pytest.fixture(scope="module")
def processor():
    return Idefics2Processor.from_pretrained()


def assert_equal_batches(ours, reference):
    assert set(ours) == set(reference.keys())
    for key in ours:
        assert ours[key].dtype == reference[key].dtype, key
        assert ours[key].shape == reference[key].shape, key
        assert torch.equal(ours[key], reference[key]), key


# ---------------------------------------------------------------------- chat template


def test_chat_template_reproduces_reference_example(processor):
    # The multi-turn example of the reference processor test (tests/models/idefics2), verbatim.
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What do these images show?"},
                {"type": "image"},
                {"type": "image"},
                "What do these images show?",
            ],
        },
        {
            "role": "assistant",
            "content": [
                {
                    "type": "text",
                    "text": "The first image shows the statue of Liberty in New York. The second image picture depicts Idefix, the dog of Obelix in Asterix and Obelix.",
                }
            ],
        },
        {"role": "user", "content": [{"type": "text", "text": "And who is that?"}]},
    ]
    expected_rendered = (
        "User: What do these images show?<image><image><end_of_utterance>\n"
        "Assistant: The first image shows the statue of Liberty in New York. The second image picture depicts Idefix, the dog of Obelix in Asterix and Obelix.<end_of_utterance>\n"
        "User: And who is that?<end_of_utterance>\n"
        "Assistant:"
    )
    # The bare string in the first turn is skipped, exactly as the official template does.
    with pytest.warns(UserWarning, match="bare string"):
        rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == expected_rendered


def test_chat_template_matches_official_jinja_template(processor):
    reference = reference_processor()
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "The left one."}]},
            {"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "text", "text": " And?"}]},
        ],
    ]
    for messages in conversations:
        for add_generation_prompt in (False, True):
            ours = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            theirs = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
            assert ours == theirs
    assert processor.apply_chat_template(conversations[0], add_generation_prompt=True) == (
        "User:<image>What is this?<end_of_utterance>\nAssistant:"
    )


def test_chat_template_plain_string_content(processor):
    # A whole-string content is taken as one text item (the official template would render
    # nothing for it, silently).
    rendered = processor.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    assert rendered == "User: Hi there<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "robot", "content": [{"type": "text", "text": "hi"}]}], "unknown role"),
        ([{"role": "User", "content": [{"type": "text", "text": "hi"}]}], "unknown role"),
        ([{"role": "user", "content": [{"type": "video"}]}], "unknown content type"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "unknown content type"),
        ([{"role": "user", "content": [{"type": "text"}]}], "needs a string 'text'"),
        ([{"role": "user", "content": []}], "non-empty"),
        ([{"content": "no role"}], "'role' and 'content'"),
        ([{"role": "user", "content": [42]}], "expected a dict"),
    ],
)
def test_chat_template_errors(processor, messages, match):
    with pytest.raises(ValueError, match=match):
        processor.apply_chat_template(messages)


# ---------------------------------------------------------------------- prompt expansion


def test_image_token_expansion(processor):
    ids = processor(text="<image>", images=[IMAGES / "chelsea.png"])["input_ids"][0].tolist()
    assert ids == [1, FAKE] + [IMAGE] * 64 + [FAKE]
    ids = processor(text="<image><image>", images=[IMAGES / "chelsea.png"] * 2)["input_ids"][0].tolist()
    assert ids == [1, FAKE] + [IMAGE] * 64 + [FAKE] + [IMAGE] * 64 + [FAKE]  # middle fake shared

    splitting = Idefics2Processor.from_pretrained(do_image_splitting=True)
    out = splitting(text="<image>Hi", images=[IMAGES / "chelsea.png"])
    ids = out["input_ids"][0].tolist()
    assert ids == [1] + ([FAKE] + [IMAGE] * 64) * 5 + [FAKE] + splitting.tokenizer.encode("Hi", add_bos=False)
    assert out["pixel_values"].shape[:2] == (1, 5)


@pytest.mark.parametrize("do_image_splitting", [False, True])
def test_matches_reference_processor(do_image_splitting):
    ours = Idefics2Processor(
        image_processor=Idefics2ImageProcessor(do_image_splitting=do_image_splitting), image_seq_len=64
    )
    reference = reference_processor(do_image_splitting)
    text = ["<image>In this image, we see", "bla, bla<image><image>"]
    nested = [[open_rgb("coffee.png")], [open_rgb("page.png"), open_rgb("rocket.jpg")]]
    expected = reference(text=text, images=nested, padding=True, return_tensors="pt")
    assert_equal_batches(ours(text=text, images=nested), expected)
    # A flat list is dealt out by each prompt's <image> count; paths work as well as PIL images.
    flat = [IMAGES / "coffee.png", IMAGES / "page.png", IMAGES / "rocket.jpg"]
    assert_equal_batches(ours(text=text, images=flat), expected)
    assert expected["attention_mask"][0, 0] == 0 and expected["input_ids"][0, 0] == 0  # left padding


def test_chat_prompt_ids_are_the_trained_ones(processor):
    """Against the reference processor, the only difference in a chat prompt is the trained
    "▁" (28705) between <end_of_utterance> and "\\n" (see tests/test_tokenizer.py)."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat on a sofa."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [open_rgb("chelsea.png"), open_rgb("coffee.png")]
    ours = processor(text=prompt, images=images)
    reference = reference_processor()(text=prompt, images=images, return_tensors="pt")
    trained_ids = []
    newer_ids = reference["input_ids"][0].tolist()
    for position, token_id in enumerate(newer_ids):
        trained_ids.append(token_id)
        if token_id == EOU and newer_ids[position + 1 : position + 2] == [13]:
            trained_ids.append(28705)
    assert ours["input_ids"][0].tolist() == trained_ids
    assert torch.equal(ours["pixel_values"], reference["pixel_values"])
    assert torch.equal(ours["pixel_attention_mask"], reference["pixel_attention_mask"])


def test_transparent_image_composited_onto_white_in_processor(processor):
    """We follow the reference *image processor* (white background), which is how the model
    was trained; the reference *processor* converts with PIL first and so drops the alpha."""
    rgba = np.array(open_rgb("horse.png"))
    rgba[:, :200, 3] = 0
    image = PIL.Image.fromarray(rgba)
    ours = processor(text="<image>", images=[image])
    image_processor_only = reference_processor().image_processor([[image]], return_tensors="pt")
    assert torch.equal(ours["pixel_values"], image_processor_only["pixel_values"])
    reference = reference_processor()(text="<image>", images=[image], return_tensors="pt")
    assert not torch.equal(ours["pixel_values"], reference["pixel_values"])


def test_text_only_images_only_and_empty_samples(processor):
    out = processor(text=["Hello", "A longer prompt here"])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64
    assert out["input_ids"][0].tolist()[:3] == [0, 0, 0] and out["attention_mask"][0].tolist()[:3] == [0, 0, 0]
    images_only = processor(images=[IMAGES / "page.png"])
    assert set(images_only) == {"pixel_values", "pixel_attention_mask"}
    # One prompt without images next to one with: all-zero image slots for the first.
    mixed = processor(text=["No image here", "<image>Describe"], images=[[], [IMAGES / "page.png"]])
    assert mixed["pixel_values"].shape[:2] == (2, 1)
    assert (mixed["pixel_values"][0] == 0).all() and (mixed["pixel_attention_mask"][0] == 0).all()


def test_decode_delegates_to_tokenizer(processor):
    ids = processor(text="User: Hi<end_of_utterance>\nAssistant:")["input_ids"]
    assert processor.decode(ids[0]) == "<s>User: Hi<end_of_utterance>\nAssistant:"
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["User: Hi \nAssistant:"]


def test_from_pretrained_reads_configs(tmp_path):
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_seq_len": 8}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_image_splitting": True}))
    loaded = Idefics2Processor.from_pretrained(tmp_path)
    assert loaded.image_seq_len == 8 and loaded.image_processor.do_image_splitting
    assert loaded.tokenizer.model_file == SHIPPED_TOKENIZER_MODEL
    ids = loaded(text="<image>", images=[IMAGES / "page.png"])["input_ids"][0].tolist()
    assert ids == [1] + ([FAKE] + [IMAGE] * 8) * 5 + [FAKE]
    with pytest.raises(FileNotFoundError):
        Idefics2Processor.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------- bad prompts


def test_image_count_mismatch_errors(processor):
    page = IMAGES / "page.png"
    reference = reference_processor()
    # Cases the reference rejects too.
    for text, images in [
        (["<image>a", "b<image>"], [page]),  # flat list: 2 tokens, 1 image
        (["<image>a", "b"], [page, page]),  # flat list: 1 token, 2 images
        (["<image>a", "b<image>"], [[page], []]),  # nested: per-prompt counts differ
        ("no image token", [page]),
    ]:
        with pytest.raises(ValueError, match="image"):
            processor(text=text, images=images)
        pil_images = (
            [[open_rgb("page.png") for _ in s] for s in images]
            if isinstance(images[0], list)
            else [open_rgb("page.png") for _ in images]
        )
        with pytest.raises(ValueError):
            reference(text=text, images=pil_images, padding=True, return_tensors="pt")
    # Stricter than the reference: <image> tokens but no images at all.
    with pytest.raises(ValueError, match="no images were given"):
        processor(text="<image>What is it?")
    with pytest.raises(ValueError, match="one list per prompt"):
        processor(text=["<image>a", "<image>b"], images=[[page]])


def test_bad_text_and_image_inputs(processor, tmp_path):
    with pytest.raises(ValueError, match="text must be"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="Give text, images, or both"):
        processor()
    with pytest.raises(FileNotFoundError):
        processor(text="<image>", images=[tmp_path / "missing.jpg"])
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError):
        processor(text="<image>", images=[tmp_path / "bad.jpg"])
