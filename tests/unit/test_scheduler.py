from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.scheduler import Scheduler
from kiln.runtime.sequence import Sequence
from kiln.sampling_params import SamplingParams


def seq(name: str, n: int) -> Sequence:
    return Sequence(request_id=name, prompt_ids=list(range(n)), params=SamplingParams(max_tokens=4))


def run(plan):
    """Pretend the model ran: cache what was scheduled and add a token where one is due."""
    for chunk in plan.chunks:
        chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
        if chunk.completes:
            chunk.seq.output_ids.append(0)


def test_long_prompt_is_chunked_under_the_token_budget_and_decodes_keep_running():
    sched = Scheduler(KVCacheManager(64, 4), max_batch_size=4, max_num_tokens=8)
    short, long_ = seq("short", 3), seq("long", 20)
    sched.add(short)
    run(sched.schedule())  # short prefilled
    sched.add(long_)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("short", 1), ("long", 7)]
    assert not plan.chunks[1].completes
    run(plan)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("short", 4, 1), ("long", 7, 7)]
    assert plan.num_tokens <= 8


def test_batch_never_exceeds_max_batch_size():
    sched = Scheduler(KVCacheManager(64, 4), max_batch_size=2, max_num_tokens=100)
    for i in range(5):
        sched.add(seq(f"s{i}", 3))
    plan = sched.schedule()
    assert len(plan.chunks) == 2 and len(sched.running) == 2 and len(sched.waiting) == 3


def test_preempts_latest_when_blocks_run_out_and_recomputes_it_later():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    a, b = seq("a", 8), seq("b", 7)
    sched.add(a)
    sched.add(b)
    run(sched.schedule())  # a: 2 blocks, b: 2 blocks, pool full
    assert kv.num_free_blocks == 0
    plan = sched.schedule()  # a now needs a third block (9 tokens): b must give way
    assert [s.request_id for s in plan.preempted] == ["b"]
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    assert b.num_computed_tokens == 0 and sched.waiting[0] is b
    sched.finish(a)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("b", 0, 8)]  # prompt + its token


def test_finish_releases_blocks_from_anywhere():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(kv, max_batch_size=1, max_num_tokens=64)
    a, b = seq("a", 5), seq("b", 5)
    sched.add(a)
    sched.add(b)
    run(sched.schedule())
    sched.finish(b)  # still waiting
    sched.finish(a)  # running
    assert kv.num_free_blocks == 8 and not sched.has_work()


def test_token_slice_spans_prompt_and_output():
    s = seq("s", 5)
    s.output_ids.extend([100, 101, 102])
    for start in range(8):
        for end in range(start, 9):
            assert s.token_slice(start, end) == s.all_ids[start:end]


def test_a_shared_prompt_prefix_is_computed_once():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    first = Sequence(request_id="first", prompt_ids=list(range(10)), params=SamplingParams(max_tokens=4))
    sched.add(first)
    plan = sched.schedule()
    run(plan)
    for chunk in plan.chunks:  # what the engine does after each step
        kv.register_computed(chunk.seq.request_id, chunk.seq.token_slice, chunk.seq.num_computed_tokens)
    second = Sequence(request_id="second", prompt_ids=list(range(9)) + [99], params=SamplingParams(max_tokens=4))
    sched.add(second)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("first", 10, 1), ("second", 8, 2)]
    assert second.num_cached_tokens == 8
    assert kv.block_table("second")[:2] == kv.block_table("first")[:2]
    assert (sched.prefix_query_tokens, sched.prefix_hit_tokens) == (20, 8)


def test_a_failed_admission_returns_the_attached_prefix_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    sched = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    a = seq("a", 9)
    sched.add(a)
    plan = sched.schedule()
    run(plan)
    kv.register_computed("a", a.token_slice, a.num_computed_tokens)
    big = Sequence(request_id="big", prompt_ids=list(range(8)) + [50] * 12, params=SamplingParams(max_tokens=1))
    sched.add(big)
    plan = sched.schedule()  # big would need 5 blocks with its 2 cached ones: it must wait
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    assert kv.block_table("big") == [] and kv.ref_count(kv.block_table("a")[0]) == 1
    assert big.num_computed_tokens == 0 and sched.waiting[0] is big
