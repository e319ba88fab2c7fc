"""Text of each request: an incremental detokenizer per sequence, the text a step adds, the rest on finish.

The scheduler decides when a sequence ends; it asks `push` for the stop strings, so that a token's
text is decoded (and checked) once. `process` then turns the tokens a step placed into `StepUpdate`s:
the text that became final, plus, for a sequence that just ended, whatever text was still held back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.detokenizer import IncrementalDetokenizer
from kiln.runtime.sequence import Sequence

CONTEXT_TOKENS = 4  # prompt tokens decoded before the first generated one (see IncrementalDetokenizer)


@dataclass
class StepUpdate:
    """What one step did for one request: tokens added, text that became final, and whether it ended."""

    seq: Sequence
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""

    @property
    def finished(self) -> bool:
        return self.seq.is_finished


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._text: dict[str, str] = {}  # request id -> text its token of this step made final

    def add(self, seq: Sequence) -> None:
        """Give a new sequence its detokenizer (`seq.detokenizer`; its `text` is the request's output)."""
        params = seq.params
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, params.stop, params.skip_special_tokens, context_ids=seq.prompt_ids[-CONTEXT_TOKENS:]
        )

    def push(self, seq: Sequence, token: int) -> str | None:
        """Decode a generated token; the stop string its text now contains, if any (a `StopStringCheck`)."""
        detokenizer = seq.detokenizer
        text = detokenizer.push(token)
        if text:
            self._text[seq.request_id] = text
        return detokenizer.stop_reason if detokenizer.stopped else None

    def process(self, placed: list[tuple[Sequence, int]]) -> list[StepUpdate]:
        """One update per placed token; a sequence that ended gets the text still held back (flush)."""
        updates = []
        pending = self._text
        for seq, token in placed:
            update = StepUpdate(seq, [token], pending.pop(seq.request_id, "") if pending else "")
            if seq.is_finished and seq.params.detokenize and not seq.detokenizer.stopped:
                update.delta_text += seq.detokenizer.flush()
            updates.append(update)
        pending.clear()  # text of a step that failed half-way has no one to go to
        return updates
