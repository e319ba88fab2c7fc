"""Chooses which tokens of which sequences run in the next step.

There are no prefill and decode phases: each sequence has tokens (prompt + generated) and a count of
tokens already in the cache, and a step computes some of the rest under a token budget. Running
sequences go first, in arrival order; waiting ones join while batch slots, budget and cache blocks
last. A long prompt is split into chunks across steps. When the block pool runs dry, the most
recently admitted running sequence is preempted: its blocks are freed and it is recomputed later.
A sequence joining the batch first attaches the cached blocks its tokens start with (prefix caching),
so only the rest is computed; this also makes recomputing a preempted sequence cheap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.sequence import Sequence, Status


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


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_batch_size: int, max_num_tokens: int) -> None:
        self.kv = kv
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefix_query_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of those, tokens whose KV was already cached

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
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = seq.schedulable(seq.num_computed_tokens, min(seq.num_tokens - seq.num_computed_tokens, budget))
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
            cached = self.kv.match_prefix(seq.request_id, seq.all_ids, seq.block_extra_keys)
            n = seq.schedulable(cached, min(seq.num_tokens - cached, budget))
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

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that finished or was cancelled, wherever it is."""
        self.kv.free(seq.request_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
