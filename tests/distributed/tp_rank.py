"""Ranks of tensor-parallel engines, as the tests launch them (under torchrun, or with its variables set).

    python tp_rank.py OUT.json PROMPTS.json ENGINE [ENGINE ...] [--num-kv-blocks N] [--hold DIR]

Every rank loads each engine in turn; ranks other than 0 follow rank 0 inside `LLM(...)` until rank 0 is
done with it. Rank 0 generates greedily (EOS ignored) and writes {engine: {"tokens": [[...], ...],
"preemptions": n}}. With --hold, rank 0 first writes DIR/ready and waits for DIR/go (the failure test
kills a rank in between)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kiln import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("prompts")
    p.add_argument("engines", nargs="+")
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--hold", default=None)
    p.add_argument("--new-tokens", type=int, default=12)
    args = p.parse_args()
    results = {}
    for path in args.engines:
        try:
            llm = LLM(path, num_kv_blocks=args.num_kv_blocks, collective_timeout_s=10.0)
        except SystemExit as done:  # a following rank: rank 0 is done with this engine
            if done.code:
                raise
            continue
        if args.hold:
            (Path(args.hold) / "ready").touch()
            while not (Path(args.hold) / "go").exists():
                time.sleep(0.05)
        engine = llm.engine
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        prompts = json.loads(Path(args.prompts).read_text())
        seqs = [engine.add_request(engine.validate(ids, params)) for ids in prompts]
        while engine.has_unfinished():
            engine.step()
        results[path] = {"tokens": [s.output_ids for s in seqs], "preemptions": sum(s.num_preemptions for s in seqs)}
        engine.release_ranks()
    if results:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
