"""OutputProcessor with the scheduler: streamed text, stop strings, and the held-back text on finish."""

from __future__ import annotations

from collections.abc import Sequence as Ids

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.output_processor import OutputProcessor, StepUpdate
from kiln.runtime.scheduler import Scheduler, StepOutput
from kiln.runtime.sequence import Sequence
from kiln.sampling_params import SamplingParams

PIECES = ["<eos>", "a", "b", " ", "X", "Y", "Z", "!"]
EOS = 0


class Pieces:
    """A tokenizer whose ids are the indices of PIECES (id 0 is a special token)."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        return "".join(PIECES[t] for t in token_ids if not (skip_special_tokens and t == EOS))


def ids(text: str) -> list[int]:
    return [PIECES.index(c) for c in text]


def generate(tokens: Ids[int], **params) -> tuple[Sequence, list[StepUpdate]]:
    """Admit a 3-token prompt, then feed `tokens` one step at a time as the engine does."""
    sched = Scheduler(KVCacheManager(16, 4), max_batch_size=1, max_num_tokens=64, eos_ids=frozenset({EOS}))
    outputs = OutputProcessor(Pieces())
    seq = Sequence("r", ids("ab "), SamplingParams(**{"max_tokens": 16, **params}))
    outputs.add(seq)
    sched.add(seq)
    updates: list[StepUpdate] = []
    for token in tokens:
        plan = sched.schedule()
        placed = sched.update_from_output(StepOutput(plan.chunks, [seq], [token]), outputs.push, now=0.0)
        updates += outputs.process(placed)
        if seq.is_finished:
            break
    return seq, updates


def test_streamed_text_adds_up_and_ends_with_what_was_held_back():
    seq, updates = generate(ids("ab X!bX"), stop=["XYZ"], max_tokens=7)
    assert [u.new_token_ids for u in updates] == [[t] for t in ids("ab X!bX")]
    assert "".join(u.delta_text for u in updates) == seq.detokenizer.text == "ab X!bX"
    assert updates[-2].delta_text == "b"  # the last "X" could start "XYZ": held back ...
    assert updates[-1].delta_text == "X" and updates[-1].finished  # ... until the sequence ended
    assert seq.finish_reason == "length"


def test_a_stop_string_ends_the_sequence_and_is_never_output():
    seq, updates = generate(ids("aXYZbb"), stop=["XYZ"])
    assert (seq.finish_reason, seq.stop_reason) == ("stop", "XYZ")
    assert len(updates) == 4 and updates[-1].finished
    assert "".join(u.delta_text for u in updates) == seq.detokenizer.text == "a"


def test_eos_is_a_token_without_text():
    seq, updates = generate([*ids("ab"), EOS, *ids("ab")])
    assert [u.new_token_ids for u in updates] == [[1], [2], [EOS]]
    assert updates[-1].delta_text == "" and updates[-1].finished and seq.finish_reason == "stop"
    assert seq.detokenizer.text == "ab" and seq.output_ids == [*ids("ab"), EOS]


def test_no_text_without_detokenize():
    seq, updates = generate(ids("aXYZ"), detokenize=False, max_tokens=4)
    assert all(u.delta_text == "" for u in updates) and seq.detokenizer.text == ""
    assert seq.finish_reason == "length" and seq.output_ids == ids("aXYZ")


def test_the_first_token_is_decoded_after_the_prompts_last_tokens():
    class SpaceEater(Pieces):  # a decoder that drops a leading space, as SentencePiece ones do
        def decode(self, token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=None):  # type: ignore[override]
            return super().decode(token_ids, skip_special_tokens).removeprefix(" ")

    outputs = OutputProcessor(SpaceEater())
    seq = Sequence("r", ids("ab"), SamplingParams())
    outputs.add(seq)
    assert outputs.push(seq, PIECES.index(" ")) is None
    assert outputs.push(seq, PIECES.index("a")) is None
    assert seq.detokenizer.text == " a"
