"""Run in a new process by test_families: load each engine named on stdin, generate greedily, print the tokens.

Input (stdin, JSON): {"engines": [paths], "prompts": [[ids]], "max_tokens": n, "runtime": {LLM options}}.
Output (stdout, JSON): {path: [token ids per prompt]}. Nothing but kiln is imported before the engines load.
"""

from __future__ import annotations

import gc
import json
import sys


def main() -> None:
    job = json.load(sys.stdin)
    from kiln import LLM, SamplingParams

    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, ignore_eos=True)
    tokens = {}
    for engine in job["engines"]:
        llm = LLM(engine, **job["runtime"])
        tokens[engine] = [out.token_ids for out in llm.generate(job["prompts"], params)]
        del llm
        gc.collect()
    print(json.dumps(tokens))


if __name__ == "__main__":
    main()
