"""Chooses which tokens of which sequences run in the next step.

There are no prefill and decode phases: each sequence has tokens (prompt + generated) and a count of
tokens already in the cache, and a step computes some of the rest under a token budget. Running
sequences go first, in arrival order; waiting ones join while batch slots, budget and cache blocks
last. A long prompt is split into chunks across steps. When the block pool runs dry, the most
recently admitted running sequence is preempted: its blocks are freed and it is recomputed later.
A sequence joining the batch first attaches the cached blocks its tokens start with (prefix caching),
so only the rest is computed; this also makes recomputing a preempted sequence cheap.

After each step `update_from_output` takes what the step produced: it registers the blocks whose
tokens are now known for prefix reuse, places each sampled token, decides which sequences end (EOS,
stop token ids, stop strings as the output processor reports them, a completed grammar, max_tokens,
max_seq_len) and frees their blocks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.sequence import PENDING_TOKEN, Sequence, Status

# (sequence, its new token) -> the stop string its text now contains, or None: the output processor's push.
StopStringCheck = Callable[[Sequence, int], "str | None"]


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # tokens already in the cache
    num_tokens: int  # tokens computed this step

    @property
    def completes(self) -> bool:
        """After this chunk every known token is cached, so the step yields a new token."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What a step produced, for `Scheduler.update_from_output`.

    A pipelined step's tokens fill the placeholders (`PENDING_TOKEN`) at `indices`; its chunks were
    marked computed at launch, and a sequence's blocks are registered once its token is filled in.
    """

    computed: list[ScheduledChunk] = field(default_factory=list)  # chunks run, every token known on the host
    seqs: list[Sequence] = field(default_factory=list)  # sequences that sampled a token, one row each
    tokens: list[int] = field(default_factory=list)
    indices: list[int] | None = None  # where each token goes in its output (placeholders); None: appended
    logprobs: list[Any] | None = None


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_batch_size: int,
        max_num_tokens: int,
        eos_ids: frozenset[int] = frozenset(),
        max_seq_len: int | None = None,
        max_scored_tokens: int | None = None,
    ) -> None:
        self.kv = kv
        # Prompt tokens scored for their log-probs per step (None: no cap beyond max_num_tokens): each scored
        # token returns a logits row, so the cap bounds that memory. An image block larger than the cap is
        # scored whole when it is the step's first scored chunk, since images are never split.
        self.max_scored_tokens = max_num_tokens if max_scored_tokens is None else max_scored_tokens
        self._scored_left = self.max_scored_tokens  # of the step being scheduled
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.eos_ids = eos_ids
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_query_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, tokens whose KV was already cached
        self.num_finished = 0  # sequences finished or aborted so far

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.kv.free(seq.request_id)
        self.running.remove(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_tokens
        self._scored_left = self.max_scored_tokens
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = self._chunk_size(seq, seq.num_computed_tokens, budget)
            while not self.kv.allocate(seq.request_id, seq.num_computed_tokens + n):
                victim = next((s for s in reversed(self.running) if id(s) not in scheduled), None)
                if victim is None:
                    break
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING or n == 0:
                continue
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            scheduled.add(id(seq))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size and not out.preempted:
            seq = self.waiting[0]
            # A request scoring its prompt computes all of it: cached blocks have no logits to give.
            cached = 0
            if not seq.needs_prompt_logits:
                cached = self.kv.match_prefix(seq.request_id, seq.all_ids, seq.block_extra_keys)
            n = self._chunk_size(seq, cached, budget)
            if n == 0 or not self.kv.allocate(seq.request_id, cached + n):
                self.kv.free(seq.request_id)  # gives the attached cached blocks back, still registered
                break
            seq.num_computed_tokens = cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += cached
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return out

    def _chunk_size(self, seq: Sequence, start: int, budget: int) -> int:
        """Tokens of `seq` from `start` to run this step, within the token budget and the scoring cap."""
        wanted = min(seq.num_tokens - start, budget)
        if not seq.needs_prompt_logits:
            return seq.schedulable(start, wanted)
        n = seq.schedulable(start, min(wanted, self._scored_left))
        if n == 0 and self._scored_left == self.max_scored_tokens and seq.mm is not None:
            block = seq.mm.block_at(start)  # an image block over the cap: that block alone, if the budget holds it
            n = block if block <= wanted else 0
        self._scored_left = max(0, self._scored_left - n)
        return n

    def update_from_output(
        self, out: StepOutput, stop_string: StopStringCheck, now: float
    ) -> list[tuple[Sequence, int]]:
        """Apply a step's results; returns (sequence, token) for every token placed, in row order.

        A token sampled for a sequence that ended at an earlier step (computed past its end by a
        pipelined step) is dropped."""
        for chunk in out.computed:
            seq = chunk.seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            self.kv.register_computed(seq.request_id, seq.token_slice, seq.num_computed_tokens, seq.block_extra_keys)
        placed = []
        finished = Status.FINISHED
        logprobs = repeat(None) if out.logprobs is None else out.logprobs
        if out.indices is None:
            for seq, token, logprob in zip(out.seqs, out.tokens, logprobs):
                if seq.status is not finished:
                    self._place(seq, token, None, logprob, now, stop_string)
                    placed.append((seq, token))
            return placed
        for seq, token, index, logprob in zip(out.seqs, out.tokens, out.indices, logprobs):
            if seq.status is finished:
                continue
            self._place(seq, token, index, logprob, now, stop_string)
            placed.append((seq, token))
            if seq.status is not finished:  # its last computed token is known now
                self.kv.register_computed(
                    seq.request_id, seq.token_slice, seq.num_computed_tokens, seq.block_extra_keys
                )
        return placed

    def _place(
        self, seq: Sequence, token: int, index: int | None, logprob: Any, now: float, stop_string: StopStringCheck
    ) -> None:
        """Add a sampled token (or fill the placeholder at `index`) and decide whether the sequence ends."""
        if index is None:
            seq.output_ids.append(token)
            index = len(seq.output_ids) - 1
        else:
            seq.output_ids[index] = token
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.first_token_time is None:
            seq.first_token_time = now
        params = seq.params
        reason: str | None = None
        if token in self.eos_ids and not params.ignore_eos:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason, seq.stop_reason = "stop", token
        elif params.detokenize and (stop := stop_string(seq, token)) is not None:
            reason, seq.stop_reason = "stop", stop
        elif seq.grammar is not None and seq.grammar.complete:  # the JSON or regex is whole
            reason = "stop"
        elif index + 1 >= params.max_tokens or (
            self.max_seq_len is not None and len(seq.prompt_ids) + index + 1 >= self.max_seq_len
        ):
            reason = "length"
        if reason is not None:
            del seq.output_ids[index + 1 :]  # a placeholder of a step still in flight
            seq.finish_reason = reason
            seq.finish_time = now
            self.finish(seq)

    def abort(self, seq: Sequence) -> None:
        """End an unfinished sequence with reason "abort", dropping placeholders of a step in flight."""
        if seq.is_finished:
            return
        seq.finish_reason = "abort"
        while seq.output_ids and seq.output_ids[-1] == PENDING_TOKEN:
            seq.output_ids.pop()
        self.finish(seq)

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that finished or was cancelled, wherever it is."""
        self.kv.free(seq.request_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.num_finished += 1
