import pytest

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.scheduler import Scheduler, StepOutput
from kiln.runtime.sequence import PENDING_TOKEN, Sequence
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


# ---- update_from_output: placing sampled tokens, finishing, registering blocks --------------------------


def admitted(sched: Scheduler, name: str, n: int, **params) -> tuple[Sequence, object]:
    """A sequence of n prompt tokens, admitted and prefilled in one step: (sequence, the step's plan)."""
    s = Sequence(request_id=name, prompt_ids=list(range(1, n + 1)), params=SamplingParams(**params))
    sched.add(s)
    return s, sched.schedule()


def no_stop_strings(seq: Sequence, token: int) -> str | None:
    return None


def test_tokens_are_appended_until_max_tokens_and_the_finished_prompt_stays_cached():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(kv, max_batch_size=2, max_num_tokens=64, eos_ids=frozenset({0}), max_seq_len=64)
    a, plan = admitted(sched, "a", 8, max_tokens=2)
    placed = sched.update_from_output(StepOutput(plan.chunks, [a], [50]), no_stop_strings, now=1.0)
    assert placed == [(a, 50)] and a.output_ids == [50] and a.num_computed_tokens == 8
    assert not a.is_finished and a.first_token_time == 1.0
    plan = sched.schedule()
    sched.update_from_output(StepOutput(plan.chunks, [a], [51]), no_stop_strings, now=2.0)
    assert a.output_ids == [50, 51] and (a.finish_reason, a.finish_time) == ("length", 2.0)
    assert a.is_finished and not sched.has_work()
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 2  # the computed blocks stay for prefix reuse


@pytest.mark.parametrize(
    ("token", "params", "reason", "stop_reason", "decoded"),
    [
        (0, {}, "stop", None, False),  # EOS: never decoded
        (0, {"ignore_eos": True}, None, None, True),  # an ordinary token then
        (7, {"stop_token_ids": [7]}, "stop", 7, False),
        (9, {}, "stop", "END", True),  # the output processor reports a stop string
        (9, {"detokenize": False}, None, None, False),  # no text: no stop strings
    ],
)
def test_what_ends_a_sequence(token, params, reason, stop_reason, decoded):
    sched = Scheduler(KVCacheManager(8, 4), max_batch_size=2, max_num_tokens=64, eos_ids=frozenset({0}))
    s, plan = admitted(sched, "s", 3, max_tokens=5, **params)
    asked = []

    def stop_strings(seq: Sequence, tok: int) -> str | None:
        asked.append(tok)
        return "END" if tok == 9 else None

    sched.update_from_output(StepOutput(plan.chunks, [s], [token]), stop_strings, now=0.0)
    assert (s.finish_reason, s.stop_reason) == (reason, stop_reason)
    assert asked == ([token] if decoded else [])


def test_max_seq_len_ends_a_sequence():
    sched = Scheduler(KVCacheManager(8, 4), max_batch_size=2, max_num_tokens=64, max_seq_len=6)
    s, plan = admitted(sched, "s", 5, max_tokens=10)
    sched.update_from_output(StepOutput(plan.chunks, [s], [42]), no_stop_strings, now=0.0)
    assert s.finish_reason == "length" and s.num_tokens == 6


def test_pipelined_tokens_fill_placeholders_and_a_token_past_the_end_is_dropped():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(kv, max_batch_size=2, max_num_tokens=64, eos_ids=frozenset({0}))
    a, plan = admitted(sched, "a", 4, max_tokens=8)
    sched.update_from_output(StepOutput(plan.chunks, [a], [11]), no_stop_strings, now=0.0)
    # Two steps launched before their tokens are read: each computed a token and left a placeholder.
    for _ in range(2):
        plan = sched.schedule()
        (chunk,) = plan.chunks
        a.num_computed_tokens = chunk.start + chunk.num_tokens
        a.output_ids.append(PENDING_TOKEN)
    assert a.output_ids == [11, PENDING_TOKEN, PENDING_TOKEN]
    cached = kv.num_cached_blocks
    placed = sched.update_from_output(StepOutput(seqs=[a], tokens=[0], indices=[1]), no_stop_strings, now=3.0)
    assert placed == [(a, 0)] and a.finish_reason == "stop"
    assert a.output_ids == [11, 0]  # the second step's placeholder is gone
    assert kv.num_cached_blocks == cached  # a sequence ending with this token registers nothing more
    placed = sched.update_from_output(StepOutput(seqs=[a], tokens=[5], indices=[2]), no_stop_strings, now=4.0)
    assert placed == [] and a.output_ids == [11, 0] and kv.num_free_blocks == 8


def test_a_filled_placeholder_registers_its_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(kv, max_batch_size=2, max_num_tokens=64)
    a, plan = admitted(sched, "a", 3, max_tokens=8)
    sched.update_from_output(StepOutput(plan.chunks, [a], [11]), no_stop_strings, now=0.0)
    assert kv.num_cached_blocks == 0  # 3 tokens computed: no full block yet
    plan = sched.schedule()  # computes token 11: the first block is full
    a.num_computed_tokens = 4
    a.output_ids.append(PENDING_TOKEN)
    sched.update_from_output(StepOutput(seqs=[a], tokens=[12], indices=[1]), no_stop_strings, now=1.0)
    assert a.output_ids == [11, 12] and kv.num_cached_blocks == 1


def test_abort_drops_placeholders_and_frees_blocks():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    sched = Scheduler(kv, max_batch_size=2, max_num_tokens=64)
    a, plan = admitted(sched, "a", 3, max_tokens=8)
    a.output_ids.extend([4, PENDING_TOKEN])
    sched.abort(a)
    assert a.finish_reason == "abort" and a.output_ids == [4] and kv.num_free_blocks == 8 and not sched.has_work()
    sched.abort(a)  # already ended: nothing changes
    assert a.finish_reason == "abort"


def scoring(name: str, n: int) -> Sequence:
    s = seq(name, n)
    s.prompt_logprobs = [None]  # the request asked for its prompt's log-probs: every prompt token is scored
    return s


def test_prompt_tokens_scored_per_step_are_capped_and_other_requests_keep_the_rest_of_the_budget():
    sched = Scheduler(KVCacheManager(1024, 4), max_batch_size=4, max_num_tokens=1000, max_scored_tokens=300)
    a, b, plain = scoring("a", 200), scoring("b", 250), seq("plain", 150)
    for s in (a, b, plain):
        sched.add(s)
    plan = sched.schedule()
    # a takes 200 of the 300 scored rows, b the other 100, the plain prompt is not capped
    chunks = [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks]
    assert chunks == [("a", 0, 200), ("b", 0, 100), ("plain", 0, 150)]
    run(plan)
    a.prompt_logprobs += [None] * 199  # a's prompt is scored; b's first 100 tokens too
    b.prompt_logprobs += [None] * 100
    plan = sched.schedule()
    chunks = [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks]
    assert chunks == [("a", 200, 1), ("b", 100, 150), ("plain", 150, 1)]


def test_an_image_block_larger_than_the_scoring_cap_is_scored_whole_as_the_step_s_first_scored_chunk():
    import torch

    from kiln.runtime.multimodal import MultimodalData

    def with_image(name: str) -> Sequence:
        s = scoring(name, 40)
        s.mm = MultimodalData(embeds=torch.randn(30, 8), rows=torch.full((40,), -1), spans=(), blocks=((5, 35),))
        return s

    sched = Scheduler(KVCacheManager(256, 4), max_batch_size=4, max_num_tokens=64, max_scored_tokens=8)
    first, second = with_image("first"), with_image("second")
    sched.add(first)
    sched.add(second)
    plan = sched.schedule()
    # the text before first's image, then 3 of second's: the cap of 8 scored tokens
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("first", 5), ("second", 3)]
    run(plan)
    first.prompt_logprobs += [None] * 5
    second.prompt_logprobs += [None] * 3
    plan = sched.schedule()
    # the 30-token image cannot be split and is over the cap of 8: it goes whole and alone (no text after it,
    # no other scored chunk)
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("first", 5, 30)]
    run(plan)
    first.prompt_logprobs += [None] * 30
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in plan.chunks] == [("first", 35, 5), ("second", 3, 2)]
