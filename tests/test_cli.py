"""The command line: the README command from a clean state, chat with a kept cache, `check`,
and a clear one-line error (no traceback, non-zero exit) for each bad input.

Most cases call `cli.main(argv)` in this process (a subprocess costs ~2 s of imports); the
README command and one bad input run as real subprocesses to prove the whole path."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import idefics2_mini as im
from idefics2_mini import backends, chat, cli, demo
from idefics2_mini.processor import Idefics2Processor, render_chat

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = "idefics2_mini/assets/chelsea.png"
README_COMMAND = ["-m", "idefics2_mini", "--image", EXAMPLE_IMAGE, "What animal is in this picture?"]


def run_cli(*args: str, weights_root: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, demo.WEIGHTS_DIR_ENV: str(weights_root), "OMP_NUM_THREADS": "1"}
    env.pop(cli.DEBUG_ENV, None)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, input=stdin, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return demo.ensure_demo_checkpoint(tmp_path_factory.mktemp("weights"))[0]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """The demo weights as 3+ shards with an index, like the official download."""
    path = tmp_path_factory.mktemp("sharded")
    im.save_checkpoint(demo.random_demo_model(), path, max_shard_bytes=4_000_000)
    shutil.copyfile(demo.SHIPPED_TOKENIZER_MODEL, path / "tokenizer.model")
    assert len(list(path.glob("model-*-of-*.safetensors"))) >= 3
    return path


@pytest.fixture
def broken(sharded_dir, tmp_path):
    """A fresh copy of the sharded checkpoint to damage."""
    copy = tmp_path / "broken"
    shutil.copytree(sharded_dir, copy)
    return copy


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


def main(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_clear_error(status: int, err: str, *fragments: str) -> None:
    assert status != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


# ---------------------------------------------------------------------------- subprocesses


def test_readme_command_from_a_clean_state(tmp_path):
    result = run_cli(*README_COMMAND, weights_root=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no tokens were streamed"
    assert "Traceback" not in result.stderr
    assert "RANDOM weights" in result.stderr and "weights/README.md" in result.stderr
    assert re.search(r"load [\d.]+ s · prefill \d+ tokens [\d.]+ s \(time to first token\) · decode 32 tokens",
                     result.stderr), result.stderr
    assert demo.demo_is_current(tmp_path / "demo-tiny")


def test_bad_input_in_a_subprocess_is_one_line(tmp_path):
    result = run_cli("-m", "idefics2_mini", "--image", "no/such/cat.png", "What is it?", weights_root=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "error: Image file not found: no/such/cat.png\n"
    assert not (tmp_path / "demo-tiny").exists()  # failed before building or loading anything


# ---------------------------------------------------------------------------- running


def test_official_folder_wins_over_the_demo(sharded_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(sharded_dir, tmp_path / "idefics2-8b")
    monkeypatch.setenv(demo.WEIGHTS_DIR_ENV, str(tmp_path))
    status, out, err = main(capsys, "--max-new-tokens", "3", "--quiet", "Hello")
    assert status == 0 and out.strip()
    assert "RANDOM" not in err and not (tmp_path / "demo-tiny").exists()


def test_sampling_is_reproducible(demo_dir, capsys):
    args = ["--weights", str(demo_dir), "--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9",
            "--quiet", "Hi"]
    first, second = main(capsys, *args, "--seed", "3"), main(capsys, *args, "--seed", "3")
    assert first[0] == 0 and first[1] == second[1]


def test_compile_flag_compiles_the_decode_step_and_answers_the_same(demo_dir, monkeypatch, capsys):
    from torch._dynamo.testing import CompileCounter  # noqa: PLC0415

    counter = CompileCounter()  # stands in for Inductor (seconds of C++ compiling; tested elsewhere)
    compile_decode = backends.compile_decode
    monkeypatch.setattr(backends, "compile_decode", lambda model: compile_decode(model, backend=counter))
    args = ["--weights", str(demo_dir), "--max-new-tokens", "6", "--quiet", "Hi"]
    torch._dynamo.reset()
    try:
        compiled = main(capsys, *args, "--compile")
    finally:
        torch._dynamo.reset()
    assert compiled == main(capsys, *args)
    assert compiled[0] == 0 and counter.frame_count == 1


def test_chat_keeps_the_cache_between_turns(demo_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/image nope.png\nAnd now?\n/quit\nnever read\n"))
    status, out, err = main(capsys, "--weights", str(demo_dir), "--chat", "--max-new-tokens", "4",
                            "--image", str(REPO / EXAMPLE_IMAGE), "What is it?")
    assert status == 0 and "Traceback" not in err
    assert "error: Image file not found: nope.png" in err  # reported; the chat goes on
    prefills = [int(n) for n in re.findall(r"prefill (\d+) tokens", err)]
    assert len(prefills) == 2 and len(out.strip().splitlines()) == 2
    # Turn 2 feeds only the new tokens: the last answer token (+ <end_of_utterance> when the
    # answer was cut by --max-new-tokens) and the new user message. Turn 1 held 64 image tokens.
    tokenizer = Idefics2Processor.from_pretrained(demo_dir).tokenizer
    new_message = tokenizer.encode("\nUser: And now?<end_of_utterance>\nAssistant:", add_bos=False)
    assert prefills[0] > 64 and prefills[1] in (len(new_message) + 1, len(new_message) + 2)


def test_a_new_turn_is_tokenized_like_the_whole_conversation(demo_dir):
    """Turn 2's ids = the tail of the full chat-template rendering, tokenized in one go; a
    new image in turn 2 goes through the processor into that turn's pixel_values."""
    model = im.Idefics2.from_pretrained(demo_dir)
    processor = Idefics2Processor.from_pretrained(demo_dir)
    options = chat.GenerationOptions(max_new_tokens=3, do_sample=False, temperature=1.0, top_k=None, top_p=None,
                                     seed=None)
    conversation = chat.Conversation(model, processor, options)
    image = str(REPO / EXAMPLE_IMAGE)
    turn1 = conversation.turn_inputs("What is it?", [image])
    pieces: list[str] = []
    conversation.answer(turn1, pieces.append)
    answer1 = "".join(pieces)
    last_answer_token = conversation.state.tokens[0, -1].item()
    turn2 = conversation.turn_inputs("And this one?", [image])
    assert turn2["pixel_values"].shape[:2] == (1, 1)
    conversation.answer(turn2, lambda piece: None)

    messages = [chat.user_message("What is it?", 1), {"role": "assistant", "content": answer1},
                chat.user_message("And this one?", 1)]
    whole = processor(text=render_chat(messages, add_generation_prompt=True), images=[image, image])
    whole_ids = whole["input_ids"][0].tolist()
    ids2 = turn2["input_ids"][0].tolist()
    assert ids2[0] == (32002 if last_answer_token == 2 else last_answer_token)  # not yet in the cache
    eou = ids2.index(32002)  # the <end_of_utterance> that closes answer 1
    assert whole_ids[-len(ids2[eou:]):] == ids2[eou:]
    assert whole_ids[: turn1["input_ids"].shape[1]] == turn1["input_ids"][0].tolist()
    assert torch.equal(whole["pixel_values"][0, 1], turn2["pixel_values"][0, 0])


# ---------------------------------------------------------------------------- bad inputs


def test_unreadable_image(demo_dir, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not a picture")
    status, _, err = main(capsys, "--weights", str(demo_dir), "--image", str(fake), "What is it?")
    assert_clear_error(status, err, "Not a readable image file", str(fake))


def test_weights_folder_missing_a_shard(broken, capsys):
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    status, _, err = main(capsys, "--weights", str(broken), "Hi")
    assert_clear_error(status, err, f"missing shard {shard.name}", "check")


def test_truncated_shard_is_caught_before_loading(broken, capsys):
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    status, _, err = main(capsys, "--weights", str(broken), "Hi")
    assert_clear_error(status, err, "truncated", shard.name)


def test_prompt_longer_than_the_maximum_positions(demo_dir, tmp_path, capsys):
    config = demo.demo_config()
    small = replace(config, text=replace(config.text, max_position_embeddings=200))
    path = demo.build_checkpoint(tmp_path / "short", small)
    status, _, err = main(capsys, "--weights", str(path), "--image", str(REPO / EXAMPLE_IMAGE), "word " * 150)
    assert_clear_error(status, err, "more than the model's maximum of 200 positions")


@pytest.mark.parametrize("argv, fragment", [
    (["--weights", "no/such/folder", "Hi"], "no such folder"),
    (["--max-new-tokens", "0", "Hi"], "--max-new-tokens must be at least 1"),
    (["--temperature", "0", "--top-p", "0.5", "Hi"], "--temperature 0 means greedy"),
    (["--temperature", "-1", "Hi"], "--temperature must be > 0"),
    (["--top-k", "0", "Hi"], "--top-k must be >= 1"),
    (["--top-p", "1.5", "Hi"], "--top-p must be in (0, 1]"),
    (["--device", "cuda:99", "Hi"], "--device cuda:99"),
    ([], "give a prompt"),
])
def test_bad_options(argv, fragment, demo_dir, capsys):
    if "--weights" not in argv:
        argv = ["--weights", str(demo_dir), *argv]
    status, _, err = main(capsys, *argv)
    assert_clear_error(status, err, fragment)


def test_usage_errors_exit_2_without_traceback(capsys):
    status, _, err = main(capsys, "--dtype", "float8", "Hi")
    assert status == 2 and "invalid choice" in err and "Traceback" not in err


# ---------------------------------------------------------------------------- check


def test_check_passes_on_a_complete_folder(sharded_dir, capsys):
    status, out, err = main(capsys, "check", str(sharded_dir))
    assert status == 0, err
    assert "tokenizer.model: ok" in out and f"{sharded_dir}: complete" in out


def test_check_reports_each_problem(broken, capsys):
    shards = sorted(broken.glob("model-*.safetensors"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-10])
    (broken / "tokenizer.model").unlink()
    status, _, err = main(capsys, "check", str(broken))
    assert status == 1 and "Traceback" not in err
    assert f"missing shard {shards[0].name}" in err
    assert f"{shards[1].name} is truncated" in err
    assert "tokenizer.model is missing" in err


def test_check_compares_the_index_with_the_shards(broken, capsys):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    shards = list(index["weight_map"].values())
    second_shard = max(set(shards), key=shards.count)  # the shard that stays named after the edit
    first_shard = next(shard for shard in sorted(set(shards)) if shard != second_shard)
    name = sorted(n for n, shard in index["weight_map"].items() if shard == second_shard)[0]
    index["weight_map"][name] = first_shard  # the index now lies about where this tensor is
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    status, _, err = main(capsys, "check", str(broken))
    assert status == 1
    assert f"{first_shard} lacks 1 tensor(s) the index puts in it: {name}" in err
    assert f"{second_shard} holds 1 tensor(s) the index does not list: {name}" in err


def test_check_compares_the_shards_with_the_config(broken, capsys):
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    status, _, err = main(capsys, "check", str(broken))
    assert status == 1 and "that config.json needs are in no shard: model.text_model.layers.2." in err


def test_check_on_missing_folder(tmp_path, capsys):
    status, _, err = main(capsys, "check", str(tmp_path / "nothing"))
    assert status == 1 and "is not a folder" in err
