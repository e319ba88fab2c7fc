"""Streaming text for one request: token ids in, final text out, stop strings applied.

`IncrementalDetokenizer.push` takes one generated token at a time and returns
only text that can no longer change, so a streaming client never has to take
anything back:

* Decoding. The ids are re-decoded with the tokenizer itself, which makes the
  result right for byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece
  style tokenizers (leading-space handling, byte fallback) alike. To stay O(n)
  over a request, each step decodes only a short window: the tokens since the
  last point where the text was complete, plus the tokens before that point
  (the same trick as Hugging Face TGI). The new text is the difference between
  the window's decode and the decode of its first part; whatever the decoder
  does at the start of a sequence (e.g. strip a leading space) happens to both
  and cancels out. If a decoder ever breaks that assumption, the step falls
  back to decoding every id.
* Incomplete characters. While the decode ends in U+FFFD (a UTF-8 sequence
  split across tokens, e.g. an emoji made of byte tokens), the text before it is
  released and the U+FFFD is held back until the character is complete.
* Stop strings. Text whose end could still grow into a stop string is held
  back. When a stop string appears, the text is cut just before it (the stop
  string is never part of the output, as in the OpenAI API), `stopped` becomes
  True and `stop_reason` names the string. When two stop strings match, the one
  that is complete first in the text wins (then the one starting earlier), so
  the result does not depend on how the text is split into tokens.

Without stop strings and after `flush`, `text` equals
``tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)``.
The WordPiece-era "clean up tokenization spaces" step is never applied: it is
off by default in transformers 5, ignored for BPE tokenizers, and it would
rewrite text that was already streamed. One known exception to the equality:
when the model emits byte tokens that are not valid UTF-8, a byte-fallback
decoder (Llama 2 style) turns the *whole* run of byte tokens into U+FFFD,
including valid characters at its start that were already streamed; the
streamed text then keeps those characters.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Protocol

_REPLACEMENT_CHAR = "\ufffd"
# Context tokens decoded before the first generated one (as in vLLM): enough for a
# SentencePiece leading space or a split character to resolve, cheap to re-decode.
_CONTEXT_WINDOW = 5
# How far back to look for context that decodes to some text (past skipped special tokens).
_MAX_CONTEXT_WINDOW = 64


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer: Hugging Face's `decode`."""

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = ..., clean_up_tokenization_spaces: bool | None = ...
    ) -> str: ...


class IncrementalDetokenizer:
    """Incremental decoding and stop-string matching for one request's generated tokens.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with its ``decode`` signature).
        stop: stop strings; non-empty.
        skip_special_tokens: leave special tokens out of the text.
        context_ids: optional ids that precede the generated ones, usually the
            last few prompt tokens. They are decoded for context but never
            emitted; with SentencePiece tokenizers this keeps the first
            generated word's leading space, which decoding the generated ids
            alone strips. With context, `text` equals
            ``decode(context_ids + ids)[len(decode(context_ids)):]``.

    Attributes (read-only):
        text: all final text emitted so far.
        stopped: a stop string appeared; further `push` calls return "".
        stop_reason: the stop string that matched, or None.
        token_ids: the generated ids pushed so far.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        *,
        context_ids: Sequence[int] = (),
    ) -> None:
        if isinstance(stop, str):
            stop = (stop,)
        for index, item in enumerate(stop):
            if not isinstance(item, str) or item == "":
                raise ValueError(f"stop[{index}] must be a non-empty string, got {item!r}")
        self._tokenizer = tokenizer
        self._backend = _backend_decoder(tokenizer)
        self._stop = tuple(stop)
        self._stop_first_chars = frozenset(item[0] for item in self._stop)
        self._max_held = max((len(item) for item in self._stop), default=1) - 1
        self._skip_special_tokens = bool(skip_special_tokens)

        self._context = [self._check_id(token_id) for token_id in context_ids]
        self._ids: list[int] = list(self._context)  # context, then generated ids
        # Window bounds into self._ids: ids[_prefix_offset:_read_offset] decode to text
        # already released; ids[_read_offset:] are not released yet.
        self._read_offset = len(self._context)
        self._prefix_offset = max(self._read_offset - _CONTEXT_WINDOW, 0)
        self._prefix_text: str | None = None  # decode(ids[_prefix_offset:_read_offset]), cached
        if self._context:
            # The window's first part must decode to some text, or a decoder that strips the
            # start of a sequence would strip the first generated token's leading space
            # (e.g. when the last context tokens are all skipped special tokens).
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
            lowest = max(self._read_offset - _MAX_CONTEXT_WINDOW, 0)
            while self._prefix_text == "" and self._prefix_offset > lowest:
                self._prefix_offset -= 1
                self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._window_released = 0  # characters of the current window's new text already released
        self._context_text: str | None = None  # decode(context), only computed by the fallback
        self._released = ""  # decoded text released by the decoding stage (before stop handling)

        self._held = ""  # released text that might start a stop string
        self._text = ""
        self._stopped = False
        self._stop_reason: str | None = None
        self._flushed = False

    @property
    def text(self) -> str:
        return self._text

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_reason(self) -> str | None:
        return self._stop_reason

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(self._ids[len(self._context) :])

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that became final because of it.

        Returns "" once `stopped` is set (the token is ignored). Raises
        RuntimeError after `flush`.
        """
        if self._flushed:
            raise RuntimeError("push() called after flush(): create a new IncrementalDetokenizer per request")
        if self._stopped:
            return ""
        self._ids.append(self._check_id(token_id))
        return self._emit(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """End of generation: release everything held back and return it.

        Held text includes a trailing U+FFFD of an unfinished character and an
        unfinished prefix of a stop string; neither will change any more. After
        a stop string matched there is nothing to release and "" is returned.
        Calling flush twice returns "" the second time.
        """
        if self._flushed:
            return ""
        self._flushed = True
        if self._stopped:
            return ""
        return self._emit(self._decode_new(final=True), final=True)

    # -- decoding stage ---------------------------------------------------------

    @staticmethod
    def _check_id(token_id: object) -> int:
        if isinstance(token_id, bool):
            raise TypeError(f"token ids must be integers, got {token_id!r}")
        try:
            value = operator.index(token_id)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"token ids must be integers, got {token_id!r} ({type(token_id).__name__})") from None
        if value < 0:
            raise ValueError(f"token ids must be >= 0, got {value}")
        return value

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:  # what the wrapper's decode does without clean-up, minus its overhead
            return str(self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens))
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_new(self, final: bool) -> str:
        """Text the pushed ids add and that can no longer change ("" if none yet).

        ``final`` (from `flush`) releases a trailing U+FFFD too.
        """
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        prefix = self._prefix_text
        window = self._decode(self._ids[self._prefix_offset :])
        # A decode ending in U+FFFD may be a character whose remaining bytes are still to
        # come: release the text before it now, and the rest once the character is done.
        complete = final or not window.endswith(_REPLACEMENT_CHAR)
        if window.startswith(prefix):
            stable = window if complete else window.rstrip(_REPLACEMENT_CHAR)
            new = stable[len(prefix) + self._window_released :]
            advance = complete and len(window) > len(prefix)
        elif complete:
            new = self._decode_new_from_start()
            advance = True
        else:
            # The window's start changed, e.g. byte fallback shows a whole run of byte
            # tokens as U+FFFD until the run is valid UTF-8: wait for the character to end.
            return ""
        if advance:
            # Everything up to here is final: start the next window at the new text.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._prefix_text = None
            self._window_released = 0
        else:
            self._window_released += len(new)
        self._released += new
        return new

    def _decode_new_from_start(self) -> str:
        """Fallback when the window's decode does not extend its first part's: decode every id.

        Reached when the context ends inside a character, or when the model produced
        bytes that are not valid UTF-8; costs one decode of the whole sequence.
        """
        if self._context_text is None:
            self._context_text = self._decode(self._context)
        full = self._decode(self._ids)
        done = self._context_text + self._released
        # If `done` is not a prefix of `full`, text already streamed disagrees with the full
        # decode and cannot be taken back; continuing after the same number of characters
        # is the closest we can get.
        return full[len(done) :]

    # -- stop-string stage ------------------------------------------------------

    def _emit(self, new: str, final: bool) -> str:
        """Pass decoded text through the stop strings; return what becomes final."""
        buffer = self._held + new
        self._held = ""
        if self._stop:
            match = self._first_stop(buffer)
            if match is not None:
                cut, stop = match
                out = buffer[:cut]
                self._stopped = True
                self._stop_reason = stop
                self._text += out
                return out
            if not final:
                held = self._held_length(buffer)
                self._held = buffer[len(buffer) - held :]
                buffer = buffer[: len(buffer) - held]
        self._text += buffer
        return buffer

    def _first_stop(self, buffer: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that ends first (then starts first), if any.

        Text emitted earlier never ends in a prefix of a stop string, so every
        match lies entirely within ``buffer``.
        """
        best: tuple[int, int, str] | None = None
        for stop in self._stop:
            start = buffer.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is None:
            return None
        return best[1], best[2]

    def _held_length(self, buffer: str) -> int:
        """Length of the longest end of ``buffer`` that is the start of some stop string."""
        for start in range(max(len(buffer) - self._max_held, 0), len(buffer)):
            if buffer[start] in self._stop_first_chars:
                tail = buffer[start:]
                if any(stop.startswith(tail) for stop in self._stop):
                    return len(buffer) - start
        return 0


def _backend_decoder(tokenizer: Any) -> Any:
    """The Rust `tokenizers.Tokenizer` behind a fast transformers tokenizer whose class does not change how
    it decodes (no `decode`/`_decode` override below the class that owns `backend_tokenizer`); else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    mro = type(tokenizer).__mro__
    owner = next((cls for cls in mro if "backend_tokenizer" in vars(cls)), None)
    if backend is None or owner is None or not callable(getattr(backend, "decode", None)):
        return None
    if any("decode" in vars(cls) or "_decode" in vars(cls) for cls in mro[: mro.index(owner)]):
        return None
    return backend
