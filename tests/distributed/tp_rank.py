"""One rank of a tensor-parallel engine, as the tests launch it (under torchrun, or with its variables set).

    python tp_rank.py ENGINE OUT.json PROMPTS.json [--num-kv-blocks N] [--hold DIR]

Every rank loads the engine; ranks other than 0 follow rank 0 inside `LLM(...)` and exit there. Rank 0
generates greedily (EOS ignored) and writes {"tokens": [[...], ...], "preemptions": n}. With --hold, rank 0
first writes DIR/ready and waits for DIR/go (the failure tests kill a rank in between)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kiln import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine")
    p.add_argument("out")
    p.add_argument("prompts")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--hold", default=None)
    p.add_argument("--new-tokens", type=int, default=12)
    args = p.parse_args()
    llm = LLM(args.engine, num_kv_blocks=args.num_kv_blocks, collective_timeout_s=20.0)
    if args.hold:
        (Path(args.hold) / "ready").touch()
        while not (Path(args.hold) / "go").exists():
            time.sleep(0.05)
    engine = llm.engine
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    seqs = [engine.add_request(engine.validate(ids, params)) for ids in json.loads(Path(args.prompts).read_text())]
    while engine.has_unfinished():
        engine.step()
    result = {"tokens": [s.output_ids for s in seqs], "preemptions": sum(s.num_preemptions for s in seqs)}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
