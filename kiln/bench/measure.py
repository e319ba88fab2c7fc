"""Timed generation runs: kiln's engine, and transformers' eager and static-cache (compiled) decoding."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kiln.errors import KilnError
from kiln.runtime.step_timer import StepTimer
from kiln.sampling_params import SamplingParams


@dataclass(frozen=True)
class LatencyResult:
    system: str
    batch: int
    input_len: int
    output_len: int
    ttft_ms: float  # until every sequence of the batch has its first token
    ms_per_token: float  # one decode step after that: the last sequence gains one token
    total_s: float
    decode_tokens: int  # tokens generated after the TTFT, counted (batch * (output_len - 1) if all began at once)

    @property
    def tokens_per_s(self) -> float:
        """Tokens counted after the TTFT over the time they took."""
        return self.decode_tokens * 1000.0 / (self.ms_per_token * (self.output_len - 1))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s}


@dataclass(frozen=True)
class ThroughputResult:
    system: str
    num_requests: int
    input_len: int
    output_len: int
    total_s: float
    mean_ttft_s: float
    output_tokens: int  # tokens generated, counted
    preemptions: int = 0  # sequences the scheduler preempted (KV pool full) and recomputed
    kv_cache_tokens: int = 0  # tokens the KV block pool holds
    steps: dict[str, Any] = field(default_factory=dict)  # StepTimer.summary(): where the time went
    memory_gib: dict[str, float] = field(default_factory=dict)  # device memory: peak allocated, free at the end
    kv_cache_dtype: str = "auto"  # the pool's storage: the model dtype (auto), fp8 or int8

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.total_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_requests * self.input_len + self.output_tokens) / self.total_s

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "output_tokens_per_s": self.output_tokens_per_s,
            "total_tokens_per_s": self.total_tokens_per_s,
        }


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Synthetic prompts: speed depends on shapes, not on which tokens they are."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, max(11, vocab - 1), (count, length), generator=g).tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kiln_latency(llm: Any, batch: int, input_len: int, output_len: int, seed: int = 0) -> LatencyResult:
    """Greedy, EOS ignored; fresh prompts for the timed run so the prefix cache cannot help it.

    The TTFT ends when the last sequence has its first token (a long batch prefill is split over steps,
    and the sequences that began first decode meanwhile); the tokens generated after it are counted.
    """
    engine = llm.engine
    vocab = engine.manifest.model.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(random_prompts(batch, input_len, vocab, seed + 1000), params)  # warm up every path
    requests = [engine.validate(ids, params) for ids in random_prompts(batch, input_len, vocab, seed)]
    _sync(engine.device)
    run = _timed_steps(engine, requests)
    if run.preemptions or run.output_lens != [output_len] * batch:
        raise KilnError(
            f"the batch of {batch} did not decode together ({run.preemptions} preemption(s), output lengths "
            f"{sorted(set(run.output_lens))}); its numbers would be wrong"
        )
    ms_per_token = _per_token_ms(run.total_s, run.ttft_s, output_len)
    return LatencyResult(
        "kiln", batch, input_len, output_len, run.ttft_s * 1000, ms_per_token, run.total_s, run.decode_tokens
    )


@dataclass(frozen=True)
class _StepRun:
    ttft_s: float  # start -> the end of the step that gave the last sequence its first token
    total_s: float
    decode_tokens: int  # tokens the steps after that gave
    preemptions: int
    output_lens: list[int]


def _timed_steps(engine: Any, requests: list[Any]) -> _StepRun:
    """Run `requests` to the end, step by step, noting when every one of them has begun."""
    seqs = [engine.add_request(r) for r in requests]
    begun: set[str] = set()
    ttft = None
    decode_tokens = 0
    start = time.perf_counter()
    try:
        while any(not s.is_finished for s in seqs):
            updates = engine.step()
            if ttft is not None:
                decode_tokens += sum(len(u.new_token_ids) for u in updates)
                continue
            begun.update(u.seq.request_id for u in updates if u.new_token_ids)
            if len(begun) == len(seqs):
                ttft = time.perf_counter() - start
        _sync(engine.device)
    finally:
        for seq in seqs:
            if not seq.is_finished:
                engine.abort(seq.request_id)
    total = time.perf_counter() - start
    return _StepRun(
        ttft if ttft is not None else total,
        total,
        decode_tokens,
        sum(s.num_preemptions for s in seqs),
        [len(s.output_ids) for s in seqs],
    )


def kiln_throughput(llm: Any, num_requests: int, input_len: int, output_len: int, seed: int = 0) -> ThroughputResult:
    """Every request submitted at once; the scheduler batches them in flight."""
    engine = llm.engine
    vocab = engine.manifest.model.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(random_prompts(2, input_len, vocab, seed + 1000), params)
    prompts = random_prompts(num_requests, input_len, vocab, seed)
    _sync(engine.device)
    engine.step_observer = timer = StepTimer(engine.device)
    start = time.perf_counter()
    try:
        outs = llm.generate(prompts, params)
        _sync(engine.device)
    finally:
        engine.step_observer = None
    total = time.perf_counter() - start
    ttft = sum(o.metrics["time_to_first_token_s"] for o in outs) / len(outs)
    generated = sum(len(o.token_ids) for o in outs)
    capacity = engine.stats().kv_tokens
    preempted = sum(o.metrics["num_preemptions"] for o in outs)
    return ThroughputResult(
        "kiln",
        num_requests,
        input_len,
        output_len,
        total,
        ttft,
        generated,
        preempted,
        capacity,
        timer.summary(),
        _memory_gib(engine.device),
        engine.build.kv_cache_dtype,
    )


def _memory_gib(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "total": total / 2**30,
        "free": free / 2**30,
        "peak_allocated": torch.cuda.max_memory_allocated(device) / 2**30,
        "reserved": torch.cuda.memory_reserved(device) / 2**30,
    }


def _per_token_ms(total_s: float, ttft_s: float, output_len: int) -> float:
    if output_len < 2:
        return ttft_s * 1000
    return (total_s - ttft_s) / (output_len - 1) * 1000


class _FirstTokenClock:
    """A streamer for transformers' generate that notes when the first new tokens reach the host.

    generate puts the prompt first, then each step's tokens (copied to the host, so the step is done).
    """

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def system_name(static: bool, compiled: bool) -> str:
    """A transformers row's name: its cache, and "+compile" only when generate compiled the model."""
    if not static:
        return "transformers eager"
    return "transformers static+compile" if compiled else "transformers static"


class TransformersBaseline:
    """transformers' own generate on the same checkpoint: eager (dynamic cache) or static cache.

    With the static cache, generate compiles the model only where transformers chooses to (CUDA and a
    few other devices, not the CPU); the row's name says which it was (`_compiled_call` is set then).
    """

    def __init__(self, checkpoint: str, dtype: torch.dtype, device: torch.device) -> None:
        from transformers import AutoModelForCausalLM

        self.device = device
        model: Any = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
        self.model = model.to(device)
        self.model.eval()
        self.vocab = int(self.model.config.vocab_size)

    def _generate(self, ids: torch.Tensor, new_tokens: int, static: bool, streamer: Any = None) -> None:
        """Exactly `new_tokens` more tokens for every row (a shorter output is refused: it would flatter)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "do_sample": False,
            "pad_token_id": 0,
            "streamer": streamer,
        }
        if static:
            kwargs["cache_implementation"] = "static"
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if tuple(out.shape) != (ids.shape[0], ids.shape[1] + new_tokens):
            raise KilnError(
                f"transformers generated {tuple(out.shape)} for {ids.shape[0]} x ({ids.shape[1]} + {new_tokens}) "
                "tokens; its numbers would be wrong"
            )

    def latency(self, batch: int, input_len: int, output_len: int, static: bool, seed: int = 0) -> LatencyResult:
        ids = torch.tensor(random_prompts(batch, input_len, self.vocab, seed), device=self.device)
        self._generate(ids, output_len, static)  # warm up (and, for the static cache, compile)
        name = system_name(static, compiled=hasattr(self.model, "_compiled_call"))
        clock = _FirstTokenClock()
        _sync(self.device)
        start = time.perf_counter()
        self._generate(ids, output_len, static, streamer=clock)
        _sync(self.device)
        total = time.perf_counter() - start
        if clock.first is None:
            raise KilnError("transformers' generate streamed no new tokens; its numbers would be wrong")
        ttft = clock.first - start  # from the same run: a separate one-token run can take longer under noise
        ms_per_token = _per_token_ms(total, ttft, output_len)
        decode_tokens = batch * (output_len - 1)
        return LatencyResult(name, batch, input_len, output_len, ttft * 1000, ms_per_token, total, decode_tokens)
