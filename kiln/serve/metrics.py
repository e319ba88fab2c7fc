"""The server's Prometheus metrics, in a registry of their own (so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from kiln.runtime.stats import EngineStats

disable_created_metrics()  # the *_created series only add noise here

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiln_requests",
            "Requests that ended, by how they ended (stop, length, abort, error)",
            ["outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "kiln_rejected_requests", "Requests refused before running, by HTTP status", ["status"], registry=r
        )
        self.prompt_tokens = Counter("kiln_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("kiln_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("kiln_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("kiln_requests_waiting", "Requests queued for the batch (queue length)", registry=r)
        self.kv_blocks_total = Gauge("kiln_kv_cache_blocks", "KV-cache blocks in the pool", registry=r)
        self.kv_blocks_free = Gauge(
            "kiln_kv_cache_free_blocks", "KV-cache blocks no request holds (cached prefixes included)", registry=r
        )
        self.kv_tokens = Gauge(
            "kiln_kv_cache_tokens", "Tokens the KV-cache pool holds (twice as many in an fp8/int8 cache)", registry=r
        )
        self.kv_usage = Gauge("kiln_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by requests", registry=r)
        self.prefix_cached_blocks = Gauge("kiln_prefix_cache_blocks", "Blocks registered for prefix reuse", registry=r)
        self.prefix_queries = Counter(
            "kiln_prefix_cache_queries_tokens", "Tokens of admitted requests looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "kiln_prefix_cache_hits_tokens", "Of those, tokens whose KV was reused from the cache", registry=r
        )
        self.time_to_first_token = Histogram(
            "kiln_time_to_first_token_seconds", "Arrival to first generated token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "kiln_inter_token_latency_seconds", "Time between a request's tokens", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.request_latency = Histogram(
            "kiln_e2e_request_latency_seconds", "Arrival to the request's end", buckets=_LATENCY_BUCKETS, registry=r
        )

    def finished(self, outcome: str, arrival: float) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.request_latency.observe(time.perf_counter() - arrival)

    def observe(self, stats: EngineStats, prefix_seen: tuple[int, int]) -> None:
        """Set the gauges from an engine's stats; the prefix counters gain what is new since `prefix_seen`."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_blocks_total.set(stats.kv_blocks)
        self.kv_blocks_free.set(stats.kv_free_blocks)
        self.kv_tokens.set(stats.kv_tokens)
        self.kv_usage.set(stats.kv_usage)
        self.prefix_cached_blocks.set(stats.prefix_cached_blocks)
        self.prefix_queries.inc(stats.prefix_query_tokens - prefix_seen[0])
        self.prefix_hits.inc(stats.prefix_hit_tokens - prefix_seen[1])

    def render(self) -> bytes:
        return generate_latest(self.registry)
