"""Each constrained request's grammar matcher: made at admission, asked for a mask each step, advanced per token.

`Grammars` belongs to one engine. It builds llguidance's view of the engine's tokenizer on first use
(kiln imports llguidance only then), compiles each distinct grammar once (an LRU cache keyed by
the grammar text), and gives every request its own copy of the compiled matcher (`RequestGrammar`).

Per step, `Grammars.mask_logits` fills the allowed-token bitmask of the constrained rows on the host
(llguidance's executor, the GIL released, while the device may still be computing the logits), copies
it to the device and sets -inf outside it; after sampling, `advance` feeds each row its token. A
matcher that reached the end of its grammar is `complete`: the scheduler ends the request ("stop").
The end-of-sequence tokens are allowed only where the grammar accepts the output as it stands.
"""

from __future__ import annotations

import importlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from kiln.errors import RequestError
from kiln.guided_decoding import GuidedDecoding, llguidance
from kiln.runtime.logits_processors import apply_bitmask, host_bitmask, to_device

log = logging.getLogger(__name__)

CACHE_SIZE = 64  # distinct grammars kept compiled


class RequestGrammar:
    """One request's matcher: where its output stands in the grammar."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.complete = False  # the grammar admits no further token: the request ends

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            log.warning("grammar refused token %d: %s", token, self.matcher.get_error().splitlines()[0])
        self.complete = bool(self.matcher.is_stopped())


class Grammars:
    """Compiled grammars of one engine's tokenizer, and the per-step mask of its constrained rows."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], capacity: int = CACHE_SIZE) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._capacity = capacity
        self._tokenizer: Any = None  # llguidance's LLTokenizer, built on first use
        self._executor: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def _ll_tokenizer(self) -> Any:
        if self._tokenizer is None:
            ll = llguidance()
            hf = importlib.import_module("llguidance.hf")
            try:
                self._tokenizer = hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos_ids or None
                )
            except ValueError as error:
                raise RequestError(f"structured output cannot use this engine's tokenizer: {error}") from None
            self._executor = ll.LLExecutor()
        return self._tokenizer

    def matcher(self, guided: GuidedDecoding) -> RequestGrammar:
        """A fresh matcher for `guided` (compiled now unless this grammar was compiled recently)."""
        template = self._compiled.get(guided.grammar)
        if template is None:
            template = llguidance().LLMatcher(self._ll_tokenizer(), guided.grammar, log_level=0)
            if template.is_error():
                raise RequestError(f"the {guided.kind} constraint cannot be compiled: {template.get_error()}")
            self._compiled[guided.grammar] = template
            if len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(guided.grammar)
        return RequestGrammar(template.deep_copy())

    @property
    def cached(self) -> int:
        """How many compiled grammars the cache holds."""
        return len(self._compiled)

    def bitmask(self, grammars: Sequence[RequestGrammar | None]) -> torch.Tensor:
        """Host ``[len(grammars), words]`` int32 bitmask: each constrained row's allowed tokens, -1 for the others."""
        mask = host_bitmask(len(grammars), self.vocab_size, torch.device("cpu"))
        self._fill(mask, grammars)
        return mask

    def mask_logits(self, logits: torch.Tensor, grammars: Sequence[RequestGrammar | None]) -> torch.Tensor:
        """`logits` (one row per entry of `grammars`) with -inf at every token a row's grammar forbids."""
        mask = host_bitmask(len(grammars), self.vocab_size, logits.device)
        self._fill(mask, grammars)
        return apply_bitmask(logits, to_device(mask, logits.device))

    def _fill(self, mask: torch.Tensor, grammars: Sequence[RequestGrammar | None]) -> None:
        rows = [(g.matcher, row) for row, g in enumerate(grammars) if g is not None]
        if rows:
            self._ll_tokenizer()
            words = mask.shape[1]
            self._executor.unsafe_compute_mask_ptr(rows, mask.data_ptr(), words * mask.element_size(), mask.shape[0])


def advance(grammars: Sequence[RequestGrammar | None], tokens: Sequence[int]) -> None:
    """Feed each constrained row the token it sampled."""
    for grammar, token in zip(grammars, tokens, strict=True):
        if grammar is not None:
            grammar.advance(token)
