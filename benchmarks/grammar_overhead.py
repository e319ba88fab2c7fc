"""What a grammar engine costs per request and per token, on the CPU: xgrammar against llguidance.

For each tokenizer (the demo's 613 tokens, and a synthesised byte-level BPE of Llama 3's 128,256
tokens, built offline) and each engine this measures:

* compile: turning one JSON schema into the engine's grammar state for this tokenizer (the first
  request with a new schema pays it; the tokenizer's own set-up is timed apart, it is paid once);
* mask: filling one row's allowed-token bitmask, per token;
* advance: feeding the chosen token to the matcher, per token.

Tokens are chosen the way a random model under the mask would: uniformly among the allowed ones
(seeded), until the grammar completes. Run: ``python benchmarks/grammar_overhead.py``
(``--engines llguidance`` for one engine; each engine is optional and skipped when not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "tiny-kiln"
LLAMA3_VOCAB = 128_256
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "tier": {"enum": ["gold", "silver", "bronze"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "integer"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tier"],
}


def synthetic_tokenizer(vocab_size: int = LLAMA3_VOCAB, seed: int = 0) -> Any:
    """A byte-level BPE of `vocab_size` tokens (Llama 3's size), made without any download.

    Tokens grow by one character from an existing token, so every merge is valid; a quarter start
    with a space, as a real vocabulary's words do. The last token is an end-of-sequence token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet)
    rng = random.Random(seed)
    letters = [c for c in byte_chars if c.isalnum()] + list('{}[]":,.-_')
    vocab: dict[str, int] = {c: i for i, c in enumerate(byte_chars)}
    tokens = list(byte_chars)
    merges: list[tuple[str, str]] = []
    space = "Ġ"  # the byte-level character of " "
    while len(vocab) < vocab_size - 1:
        base = rng.choice(tokens[256:]) if len(tokens) > 256 and rng.random() < 0.7 else rng.choice(letters)
        if rng.random() < 0.25 and not base.startswith(space) and len(base) < 12:
            left, right, new = space, base, space + base
        else:
            left, right = base, rng.choice(letters)
            new = base + right
        known = (len(left) == 1 or left in vocab) and (len(right) == 1 or right in vocab)
        if new in vocab or len(new) > 16 or not known:
            continue
        vocab[new] = len(vocab)
        tokens.append(new)
        merges.append((left, right))
    model = models.BPE(vocab=vocab, merges=merges)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|eot|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|eot|>")


def demo_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEMO)


@dataclass
class Timing:
    setup_s: float  # tokenizer set-up, once per engine process (imports excluded)
    compile_ms: list[float]
    matcher_us: list[float]  # a request's own matcher from the compiled grammar
    mask_us: list[float]
    advance_us: list[float]
    tokens: int


class Engine:
    """One grammar engine behind three calls: tokenizer set-up, compile, and a matcher's steps."""

    name = ""

    def setup(self, tokenizer: Any, vocab: int) -> None:
        raise NotImplementedError

    def compile(self, schema: str) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def advance(self, matcher: Any, token: int) -> None:
        raise NotImplementedError

    def done(self, matcher: Any) -> bool:
        raise NotImplementedError


class LLGuidance(Engine):
    name = "llguidance"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile(self, schema: str) -> Any:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        row = bitmask[0]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def advance(self, matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_stopped())


class XGrammar(Engine):
    name = "xgrammar"

    def setup(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self.xg = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(schema)

    def matcher(self, compiled: Any) -> Any:
        return self.xg.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def advance(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)

    def done(self, matcher: Any) -> bool:
        return bool(matcher.is_terminated())


ENGINES: dict[str, Callable[[], Engine]] = {"llguidance": LLGuidance, "xgrammar": XGrammar}


def allowed_ids(bitmask: torch.Tensor, vocab: int) -> list[int]:
    bits = (bitmask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    return torch.nonzero(bits.flatten()[:vocab]).flatten().tolist()


def measure(engine: Engine, tokenizer: Any, vocab: int, requests: int, seed: int) -> Timing:
    importlib.import_module(engine.name)
    start = time.perf_counter()
    engine.setup(tokenizer, vocab)
    setup_s = time.perf_counter() - start
    schema = json.dumps(SCHEMA)
    timing = Timing(setup_s, [], [], [], [], 0)
    rng = random.Random(seed)
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    for _ in range(requests):
        start = time.perf_counter()
        compiled = engine.compile(schema)
        timing.compile_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        matcher = engine.matcher(compiled)
        timing.matcher_us.append((time.perf_counter() - start) * 1e6)
        for _ in range(400):
            start = time.perf_counter()
            engine.fill(matcher, bitmask)
            timing.mask_us.append((time.perf_counter() - start) * 1e6)
            allowed = allowed_ids(bitmask, vocab)
            token = rng.choice(allowed)
            start = time.perf_counter()
            engine.advance(matcher, token)
            timing.advance_us.append((time.perf_counter() - start) * 1e6)
            timing.tokens += 1
            if engine.done(matcher):
                break
    return timing


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--requests", type=int, default=10, help="schema compiles and generations per engine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizers = {"demo (613)": demo_tokenizer, f"synthetic BPE ({LLAMA3_VOCAB:,})": synthetic_tokenizer}
    print(
        "| tokenizer | engine | tokenizer set-up s | compile ms (median) | matcher us | mask us/token"
        " (median, p90, mean) | advance us/token (median, mean) | tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, make in tokenizers.items():
        tokenizer = make()
        vocab = len(tokenizer)
        for name in args.engines:
            if importlib.util.find_spec(name) is None:
                print(f"| {label} | {name} | not installed | | | | | |")
                continue
            t = measure(ENGINES[name](), tokenizer, vocab, args.requests, args.seed)
            print(
                f"| {label} | {name} | {t.setup_s:.2f} | {statistics.median(t.compile_ms):.1f}"
                f" | {statistics.median(t.matcher_us):.0f}"
                f" | {statistics.median(t.mask_us):.0f}, {_p(t.mask_us, 0.9):.0f}, {statistics.mean(t.mask_us):.0f}"
                f" | {statistics.median(t.advance_us):.0f}, {statistics.mean(t.advance_us):.0f} | {t.tokens} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
