"""Each engine runs the kernels of its own RuntimeConfig, even beside another engine of the same process."""

from __future__ import annotations

from tiny_checkpoints import build_tiny_engine

from kiln import LLM, SamplingParams
from kiln.kernels.selection import KernelSelection, current
from kiln.runtime.step_observer import StepInfo


class SeenSelections:
    """A step observer that keeps the kernel selection in force when each step starts and runs."""

    def __init__(self) -> None:
        self.seen: set[KernelSelection] = set()

    def step_started(self) -> None:
        self.seen.add(current())

    def device_started(self) -> None:
        self.seen.add(current())

    def device_finished(self) -> None:
        pass

    def step_finished(self, info: StepInfo) -> None:
        pass


def test_two_engines_in_one_process_keep_their_own_kernel_choices(checkpoints, tmp_path):
    engine = build_tiny_engine(checkpoints("llama"), tmp_path / "e", pdl=False)
    before = current()
    reference = LLM(engine, attention_kernel="reference", linear_kernel="reference", argmax_kernel="reference")
    auto = LLM(engine)
    assert current() == before  # loading an engine does not change the caller's selection
    assert reference.engine.kernels == KernelSelection(
        attention="reference", linear="reference", argmax="reference", pdl=False
    )
    assert auto.engine.kernels == KernelSelection(pdl=False)  # the manifest's pdl, the runtime's defaults
    observers = {llm: SeenSelections() for llm in (reference, auto)}
    for llm, observer in observers.items():
        llm.engine.step_observer = observer
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for llm in (reference, auto, reference):  # interleaved: the engine loaded last decides nothing for the other
        assert len(llm.generate([[5, 6, 7]], params)[0].token_ids) == 4
    assert observers[reference].seen == {reference.engine.kernels}
    assert observers[auto].seen == {auto.engine.kernels}
    assert current() == before
