"""Generation: token-for-token parity with the reference's generate, incremental decoding equal
to a full forward, stopping, sampling, banned tokens, multi-turn cache reuse, streaming."""

from __future__ import annotations

import json

import pytest
import torch
from reference_models import image_prompt_ids, make_reference_checkpoint
from test_model_parity import left_pad, random_images

import idefics2_mini as im
from idefics2_mini.generation import GenerationDefaults, start_conversation, stream_text
from idefics2_mini.tokenizer import Idefics2Tokenizer


@pytest.fixture(scope="module", params=[3, 8], ids=["window3", "window8"])
def peaked_pair(request, tmp_path_factory):
    """Weights scaled up so logits are peaked (greedy choices are not near-ties)."""
    path = tmp_path_factory.mktemp(f"gen{request.param}")
    reference = make_reference_checkpoint(path, seed=request.param, scale=3.0, sliding_window=request.param)
    return reference, im.Idefics2.from_pretrained(path), path


def image_batch():
    pixel_values, pixel_mask = random_images([[(56, 56), (42, 56)], [(56, 28)]], seed=11)
    rows = [image_prompt_ids([1, 100, 200], 2, 4, [300, 400, 500]), image_prompt_ids([1, 7, 8, 9, 10, 11], 1, 4, [12])]
    input_ids, attention_mask = left_pad(rows)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                pixel_attention_mask=pixel_mask)


def reference_generate(reference, batch, **kwargs):
    with torch.no_grad():
        return reference.generate(**batch, do_sample=False, bad_words_ids=[[32000], [32001]], pad_token_id=0, **kwargs)


def test_greedy_equals_reference_wrapping_the_window(peaked_pair):
    """Prompt longer than the window; 40 new tokens wrap the rolling cache many times."""
    reference, ours, _ = peaked_pair
    batch = image_batch()
    expected = reference_generate(reference, batch, max_new_tokens=40, eos_token_id=None)
    got = ours.generate(**batch, max_new_tokens=40, eos_token_id=[])
    assert ours.new_cache(2, 100).capacity == ours.config.text.sliding_window
    assert torch.equal(got, expected)


def test_stops_and_pads_like_reference(peaked_pair):
    reference, ours, _ = peaked_pair
    batch = image_batch()
    free_run = ours.generate(**batch, max_new_tokens=12, eos_token_id=[])
    prompt_len = batch["input_ids"].shape[1]
    stop_token = int(free_run[0, prompt_len + 3])  # row 0 stops at its 4th token
    expected = reference_generate(reference, batch, max_new_tokens=12, eos_token_id=stop_token)
    got = ours.generate(**batch, max_new_tokens=12, eos_token_id=stop_token)
    assert torch.equal(got, expected)
    assert (got[0, prompt_len + 4 :] == 0).all()


def test_incremental_decoding_equals_full_forward(peaked_pair):
    """Per-step log-probabilities from the cache equal re-scoring the whole sequence at once."""
    _, ours, _ = peaked_pair
    batch = image_batch()
    prompt_len = batch["input_ids"].shape[1]
    out = ours.generate(**batch, max_new_tokens=20, eos_token_id=[])
    # Replay the generated tokens through a cache one at a time, keeping each step's logits.
    cache = ours.new_cache(2, prompt_len + 20)
    with torch.no_grad():
        step_logits = [ours(**batch, cache=cache, last_token_only=True)[:, -1]]
        for step in range(19):
            token = out[:, prompt_len + step : prompt_len + step + 1]
            step_logits.append(ours(token, torch.ones(2, 1), cache=cache, last_token_only=True)[:, -1])
        full_mask = torch.cat([batch["attention_mask"], torch.ones(2, 20, dtype=torch.long)], dim=1)
        full = ours(out, full_mask, batch["pixel_values"], batch["pixel_attention_mask"])
    incremental = torch.stack(step_logits, dim=1).log_softmax(-1)
    rescored = full[:, prompt_len - 1 : -1].log_softmax(-1)
    chosen = out[:, prompt_len:, None]
    assert (incremental.gather(2, chosen) - rescored.gather(2, chosen)).abs().max() <= 1e-4
    # Over the whole vocabulary (log-probs down to about -30 with these peaked weights): relative.
    assert (incremental - rescored).abs().max() <= 1e-5 * rescored.abs().max()


def test_multi_turn_cache_equals_one_long_prompt(peaked_pair):
    _, ours, _ = peaked_pair
    batch = image_batch()
    first = {k: v[:1] for k, v in batch.items()}
    first["input_ids"], first["attention_mask"] = left_pad([image_prompt_ids([1, 100, 200], 2, 4, [300, 400, 500])])
    state = start_conversation(ours, 200)
    turn1 = ours.generate(**first, max_new_tokens=6, eos_token_id=[], state=state)
    follow_up = torch.tensor([[13, 2188, 28747, 5, 6, 7, 8, 9, 10, 11]])
    turn2_prompt = torch.cat([state.unseen, follow_up], dim=1)
    turn2 = ours.generate(turn2_prompt, max_new_tokens=8, eos_token_id=[], state=state)
    whole = torch.cat([turn1, follow_up], dim=1)
    expected = ours.generate(whole, None, first["pixel_values"], first["pixel_attention_mask"], max_new_tokens=8,
                             eos_token_id=[])
    assert torch.equal(turn2[:, -8:], expected[:, -8:])
    assert torch.equal(state.tokens, torch.cat([whole, expected[:, -8:]], dim=1))


def test_sampling_is_reproducible_and_filters(peaked_pair):
    _, ours, _ = peaked_pair
    batch = image_batch()
    a = ours.generate(**batch, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    b = ours.generate(**batch, max_new_tokens=10, do_sample=True, temperature=1.5, seed=7, eos_token_id=[])
    c = ours.generate(**batch, max_new_tokens=10, do_sample=True, temperature=1.5, seed=8, eos_token_id=[])
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = ours.generate(**batch, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(ours.generate(**batch, max_new_tokens=10, do_sample=True, top_k=1, seed=1, eos_token_id=[]), greedy)
    assert torch.equal(ours.generate(**batch, max_new_tokens=10, do_sample=True, top_p=1e-6, seed=1, eos_token_id=[]),
                       greedy)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(**batch, do_sample=True, temperature=0)


def test_banned_tokens_are_never_generated(peaked_pair):
    _, ours, _ = peaked_pair
    batch = image_batch()
    prompt_len = batch["input_ids"].shape[1]
    greedy = ours.generate(**batch, max_new_tokens=5, eos_token_id=[])
    favourite = int(greedy[0, prompt_len])
    banned = ours.generate(**batch, max_new_tokens=5, eos_token_id=[], bad_words_ids=[[favourite]])
    assert favourite not in banned[:, prompt_len:].tolist()[0]
    # The image placeholders are banned by default even when the model loves them.
    with torch.no_grad():
        ours.lm_head.weight[32001] *= 0
        ours.lm_head.weight[32001] += 50 * ours.text.norm.weight.sign()
    try:
        out = ours.generate(**batch, max_new_tokens=5, eos_token_id=[])
        assert not (out[:, prompt_len:] == 32001).any()
        unbanned = ours.generate(**batch, max_new_tokens=5, eos_token_id=[], bad_words_ids=[])
        assert (unbanned[:, prompt_len:] == 32001).any()
    finally:
        ours.lm_head.weight.copy_(im.Idefics2.from_pretrained(peaked_pair[2]).lm_head.weight)


def test_generation_config_is_read(tmp_path):
    config = im.Idefics2Config()
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, 32002], "bad_words_ids": [[32000], [32001]], "pad_token_id": 0})
    )
    defaults = GenerationDefaults.from_pretrained(tmp_path, config)
    assert defaults.eos_token_ids == (2, 32002) and defaults.bad_words_ids == ((32000,), (32001,))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert GenerationDefaults.from_pretrained(tmp_path, config).eos_token_ids == (2,)


def test_prompt_too_long_is_a_clear_error(peaked_pair):
    _, ours, _ = peaked_pair
    with pytest.raises(ValueError, match="exceeds the model's maximum of 512 positions"):
        ours.generate(torch.ones(1, 500, dtype=torch.long), max_new_tokens=20)


def test_stream_text_pieces_join_to_the_answer(peaked_pair):
    _, ours, _ = peaked_pair
    tokenizer = Idefics2Tokenizer.from_pretrained()
    batch = {"input_ids": torch.tensor([[1, 415, 5565, 349]])}
    pieces = list(stream_text(ours, tokenizer, batch, max_new_tokens=15, eos_token_id=[]))
    out = ours.generate(**batch, max_new_tokens=15, eos_token_id=[])
    assert "".join(pieces) == tokenizer.decode(out[0, 4:].tolist(), skip_special_tokens=True)
    assert len(pieces) > 1
