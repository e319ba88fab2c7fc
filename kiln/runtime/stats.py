"""A snapshot of an engine's load: the server's /metrics gauges and the bench read it."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.scheduler import Scheduler


@dataclass(frozen=True)
class EngineStats:
    requests: int  # requests added and not finished or aborted
    running: int  # sequences in the running batch
    waiting: int  # sequences queued for it
    kv_blocks: int  # KV-cache blocks in the pool
    kv_block_size: int  # tokens per block
    kv_free_blocks: int  # blocks no request holds (cached prefixes included)
    kv_usage: float  # fraction of blocks held by requests
    prefix_cached_blocks: int  # blocks registered for prefix reuse
    prefix_query_tokens: int  # tokens of admitted sequences looked up in the prefix cache (since loading)
    prefix_hit_tokens: int  # of those, tokens whose KV was already cached

    @property
    def kv_tokens(self) -> int:
        """Tokens the pool holds."""
        return self.kv_blocks * self.kv_block_size


def collect(scheduler: Scheduler, kv: KVCacheManager, requests: int) -> EngineStats:
    return EngineStats(
        requests=requests,
        running=len(scheduler.running),
        waiting=len(scheduler.waiting),
        kv_blocks=kv.num_blocks,
        kv_block_size=kv.block_size,
        kv_free_blocks=kv.num_free_blocks,
        kv_usage=kv.usage,
        prefix_cached_blocks=kv.num_cached_blocks,
        prefix_query_tokens=scheduler.prefix_query_tokens,
        prefix_hit_tokens=scheduler.prefix_hit_tokens,
    )
