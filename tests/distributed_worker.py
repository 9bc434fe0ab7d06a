"""Run by tests/test_distributed.py under torchrun (2 gloo processes): this rank's tensor-parallel
model on a batch with images, padded and packed, prompt longer than the sliding window; rank 0
saves the logits and greedy tokens for the test to compare with one process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_models import image_prompt_ids  # noqa: E402
from test_model_parity import left_pad, random_images  # noqa: E402

from idefics2_mini import distributed  # noqa: E402


def batch():
    pixel_values, pixel_mask = random_images([[(56, 56), (42, 45)], [(28, 56)]], seed=2)
    rows = [image_prompt_ids([1, 100, 200], 2, 4, list(range(300, 330))), image_prompt_ids([1, 7, 8, 9], 1, 4, [12, 13])]
    input_ids, attention_mask = left_pad(rows)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                pixel_attention_mask=pixel_mask)


def run(model, inputs) -> dict:
    results = {}
    for layout in ("padded", "packed"):
        model.image_layout = layout
        with torch.no_grad():
            results[layout] = (model(**inputs), model.generate(**inputs, max_new_tokens=20, eos_token_id=[]))
    return results


def main(checkpoint: str, out: str) -> None:
    group = distributed.init_distributed(2)
    model = distributed.load_tensor_parallel(checkpoint, group)
    results = run(model, batch())
    results["weight_bytes"] = distributed.weight_bytes(model)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
