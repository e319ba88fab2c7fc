"""Ranks of a tensor-parallel vision-language engine, as the VLM test launches them under torchrun.

    python vlm_rank.py OUT.json ENGINE [ENGINE ...]

Every rank loads each engine in turn; rank 0 generates the batch of `vlm_batch()` greedily and writes
{engine: [[...], ...]}; the other ranks follow it inside `LLM(...)` until it is done with that engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parents[1]))
from vlm_checkpoints import random_image  # noqa: E402

from kiln import LLM, SamplingParams  # noqa: E402

NEW_TOKENS = 8


def vlm_batch() -> list[Any]:
    """An image prompt, a text-only one and a prompt with two images, in one batch."""
    a, b = random_image(0, 40, 60), random_image(1, 64, 30)
    return [
        {"prompt": "<image>\nThe kiln", "images": [a]},
        "The kiln fires clay",
        {"prompt": "Paged <image> attention <image> stores", "images": [b, a]},
    ]


def main() -> None:
    out, engines = sys.argv[1], sys.argv[2:]
    results = {}
    for engine in engines:
        try:
            llm = LLM(engine, collective_timeout_s=30.0)
        except SystemExit as done:  # a following rank: rank 0 is done with this engine
            if done.code:
                raise
            continue
        outs = llm.generate(vlm_batch(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
        llm.engine.release_ranks()
        results[engine] = [o.token_ids for o in outs]
    if results:
        Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
