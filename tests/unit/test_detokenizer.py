"""IncrementalDetokenizer with real (tiny, trained offline) tokenizers and a character tokenizer."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kiln.runtime.detokenizer import IncrementalDetokenizer

CORPUS = [
    "héllo wörld ✓ 日本",
    "hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog!",
    "naïve café résumé ✓✓ über straße",
    "stop here STOP now, then STOP again",
    "日本語のテキスト and English mixed",
] * 3

TEXTS = [
    "héllo wörld ✓ 日本",
    "hello world, this is a test.",
    "naïve café 🙂 résumé — 日本語 ✓ done",
    "emoji run 🙂🙃🎉 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math",
    "  leading and  double  spaces ",
    "Ünïcödé ÆØÅ ß ﬁ ŉ ǅ end",
]


def byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style: byte-level pre-tokenizer and decoder (multi-byte characters span tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def sentencepiece_style_bpe() -> PreTrainedTokenizerFast:
    """Llama-2 style: '▁' for spaces, byte fallback (<0xNN> tokens), strip of the leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40, show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_style"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return byte_level_bpe() if request.param == "byte_level" else sentencepiece_style_bpe()


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_bpe()


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, ids: Sequence[int]) -> list[str]:
    """Push every id, then flush; return the pieces returned, flush last."""
    pieces = [detok.push(token) for token in ids]
    pieces.append(detok.flush())
    return pieces


class CharTokenizer:
    """Every token is a fixed string; decode joins them. Lets tests choose the split exactly."""

    def __init__(self, pieces: Sequence[str]) -> None:
        self.pieces = list(pieces)

    def ids(self, *pieces: str) -> list[int]:
        return [self.pieces.index(piece) for piece in pieces]

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        return "".join(self.pieces[token] for token in token_ids)


# -- decoding -------------------------------------------------------------------


def test_fixture_tokenizers_really_split_characters(tokenizer: PreTrainedTokenizerFast) -> None:
    """Guard for the tests below: some token boundary must fall inside a UTF-8 character."""
    ids = encode(tokenizer, TEXTS[2])
    assert any(tokenizer.decode(ids[:end]).endswith("\ufffd") for end in range(1, len(ids)))


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = stream(detok, ids)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == expected == detok.text
    assert detok.token_ids == tuple(ids)
    assert not detok.stopped and detok.stop_reason is None


@pytest.mark.parametrize("text", TEXTS)
def test_no_half_decoded_characters_and_no_lag(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    """After each push the text holds all of the decode so far but a trailing unfinished character.

    (Byte fallback decodes a run of byte tokens to one U+FFFD per byte until the whole run
    is valid, so there the detokenizer may legitimately be ahead of the plain decode.)
    """
    ids = encode(tokenizer, text)
    final = tokenizer.decode(ids, skip_special_tokens=True)
    detok = IncrementalDetokenizer(tokenizer)
    for end, token in enumerate(ids, start=1):
        piece = detok.push(token)
        assert "\ufffd" not in piece
        so_far = tokenizer.decode(ids[:end], skip_special_tokens=True)
        assert detok.text.startswith(so_far.rstrip("\ufffd"))
        assert final.startswith(detok.text)
    assert detok.flush() == ""


def test_skip_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    ids = encode(tokenizer, "héllo wörld") + [eos] + encode(tokenizer, " 日本 ok") + [eos]
    for skip in (True, False):
        detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
        assert "".join(stream(detok, ids)) == tokenizer.decode(ids, skip_special_tokens=skip)
    assert tokenizer.eos_token in IncrementalDetokenizer(tokenizer, skip_special_tokens=False).push(eos)


def test_unfinished_character_released_by_flush(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(byte_tokenizer, "ok 🙂")
    cut = next(end for end in range(1, len(ids)) if byte_tokenizer.decode(ids[:end]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(byte_tokenizer)
    pieces = [detok.push(token) for token in ids[:cut]]
    assert "\ufffd" not in "".join(pieces)
    assert detok.flush() == "\ufffd"  # the model stopped mid-character: show the replacement
    assert detok.text == byte_tokenizer.decode(ids[:cut])


def test_context_keeps_the_leading_space() -> None:
    tokenizer = sentencepiece_style_bpe()
    prompt = encode(tokenizer, "hello")
    full = encode(tokenizer, "hello world ✓ 日本")
    assert full[: len(prompt)] == prompt
    generated = full[len(prompt) :]

    without = IncrementalDetokenizer(tokenizer)
    assert "".join(stream(without, generated)) == tokenizer.decode(generated) == "world ✓ 日本"

    with_context = IncrementalDetokenizer(tokenizer, context_ids=prompt)
    expected = tokenizer.decode(full)[len(tokenizer.decode(prompt)) :]
    assert "".join(stream(with_context, generated)) == expected == " world ✓ 日本"
    assert with_context.token_ids == tuple(generated)


def test_context_ending_in_skipped_special_tokens() -> None:
    tokenizer = sentencepiece_style_bpe()
    eos = tokenizer.eos_token_id
    context = encode(tokenizer, "hello") + [eos] * 6
    generated = encode(tokenizer, "hello world")[len(encode(tokenizer, "hello")) :]
    detok = IncrementalDetokenizer(tokenizer, context_ids=context)
    expected = tokenizer.decode(context + generated, skip_special_tokens=True)[
        len(tokenizer.decode(context, skip_special_tokens=True)) :
    ]
    assert "".join(stream(detok, generated)) == expected == " world"


def test_context_ending_mid_character(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    """The window cannot extend a context that ends in U+FFFD; the full-decode fallback takes over."""
    ids = encode(byte_tokenizer, "x 🙂 yes ✓")
    cut = next(end for end in range(1, len(ids)) if byte_tokenizer.decode(ids[:end]).endswith("\ufffd"))
    context, generated = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(byte_tokenizer, context_ids=context)
    expected = byte_tokenizer.decode(ids)[len(byte_tokenizer.decode(context)) :]
    assert "".join(stream(detok, generated)) == expected
    assert expected.endswith(" yes ✓")


def test_long_generation_matches_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(0)
    words = " ".join(rng.choice(TEXTS).split()[rng.randrange(3)] for _ in range(300))
    ids = encode(tokenizer, words)
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(stream(detok, ids)) == tokenizer.decode(ids)


class ByteTokenizer:
    """Every token is a fixed byte string; decode joins them and decodes UTF-8 with replacement."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = list(pieces)

    def decode(
        self, token_ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        return b"".join(self.pieces[token] for token in token_ids).decode("utf-8", errors="replace")


def test_context_ending_mid_character_then_a_token_finishing_it_and_more() -> None:
    tok = ByteTokenizer([b"x", "🙂".encode()[:2], "🙂".encode()[2:] + b" yes", b"!"])
    context, generated = [0, 1], [2, 3]
    assert tok.decode(context) == "x\ufffd"
    detok = IncrementalDetokenizer(tok, context_ids=context)
    assert detok.push(2) == " yes"  # decode(context + ids)[len(decode(context)):]
    assert detok.push(3) == "!"
    assert detok.flush() == ""
    assert detok.text == tok.decode(context + generated)[len(tok.decode(context)) :]


def test_text_before_an_unfinished_character_is_released_at_once() -> None:
    tok = ByteTokenizer([b"ab" + "日".encode()[:1], "日".encode()[1:2], "日".encode()[2:] + b"c"])
    detok = IncrementalDetokenizer(tok)
    assert detok.push(0) == "ab"
    assert detok.push(1) == ""
    assert detok.push(2) == "日c"
    assert detok.text == "ab日c"


# -- stop strings ---------------------------------------------------------------


def stop_boundary_cases(tokenizer: PreTrainedTokenizerFast, text: str) -> list[tuple[str, int]]:
    """(stop string, its start) for stop strings straddling each token boundary of `text`."""
    ids = encode(tokenizer, text)
    assert tokenizer.decode(ids) == text
    cases = []
    for end in range(1, len(ids)):
        boundary = len(tokenizer.decode(ids[:end]))
        if tokenizer.decode(ids[:end]).endswith("\ufffd") or not 2 <= boundary <= len(text) - 2:
            continue
        stop = text[boundary - 2 : boundary + 2]
        cases.append((stop, text.find(stop)))
    return cases


@pytest.mark.parametrize("text", ["hello world, this is a test.", "naïve café 日本語 ✓ über straße"])
def test_stop_string_across_token_boundaries(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = encode(tokenizer, text)
    cases = stop_boundary_cases(tokenizer, text)
    assert len(cases) >= 5
    for stop, start in cases:
        detok = IncrementalDetokenizer(tokenizer, stop=[stop])
        pieces = stream(detok, ids)
        # Nothing of the stop string (held back while it was only a prefix) was ever returned.
        assert "".join(pieces) == text[:start] == detok.text, stop
        assert detok.stopped and detok.stop_reason == stop
        assert pieces[-1] == ""  # flush after a stop releases nothing


def test_push_after_stop_returns_nothing(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = encode(byte_tokenizer, "hello world, this is a test.")
    detok = IncrementalDetokenizer(byte_tokenizer, stop=["world"])
    pieces = [detok.push(token) for token in ids]
    assert detok.stopped and detok.text == "hello "
    index = next(i for i, _ in enumerate(pieces) if "".join(pieces[: i + 1]) == "hello " and detok.stopped)
    assert all(piece == "" for piece in pieces[index + 1 :])
    assert detok.push(ids[0]) == ""
    assert detok.flush() == ""


def test_held_prefix_released_when_it_does_not_become_a_stop() -> None:
    tok = CharTokenizer(["ST", "O", "P", "x", "S", " "])
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    assert detok.push(tok.ids("x")[0]) == "x"
    assert detok.push(tok.ids("ST")[0]) == ""  # could be the start of "STOP"
    assert detok.push(tok.ids("O")[0]) == ""
    assert detok.push(tok.ids("x")[0]) == "STOx"  # it was not
    assert detok.push(tok.ids("S")[0]) == ""
    assert detok.flush() == "S"  # the end of the text cannot become a stop any more
    assert detok.text == "xSTOxS" and not detok.stopped


def test_held_prefix_never_emitted_when_it_becomes_a_stop() -> None:
    tok = CharTokenizer(["ST", "O", "P", "x", "S", " "])
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    pieces = [detok.push(token) for token in tok.ids("x", " ", "S", "ST", "O", "P", "x")]
    assert pieces == ["x", " ", "", "S", "", "", ""]
    assert detok.text == "x S" and detok.stopped and detok.stop_reason == "STOP"


def test_stop_inside_one_token_and_multiple_stops() -> None:
    tok = CharTokenizer(["a", "b", "c", "d", "abcd", "cd e", " "])
    detok = IncrementalDetokenizer(tok, stop=("abcdef", "cd"))
    # "cd" is complete before "abcdef" could be: it wins although "abcdef" would start earlier.
    assert detok.push(tok.ids("a")[0]) == ""
    assert detok.push(tok.ids("abcd")[0]) == "aab"
    assert detok.stop_reason == "cd"

    detok = IncrementalDetokenizer(tok, stop=("d e", "cd e"))
    assert detok.push(tok.ids("a")[0]) == "a"
    assert detok.push(tok.ids("cd e")[0]) == ""  # both end together: the one starting first wins
    assert detok.stop_reason == "cd e" and detok.text == "a"


def test_stop_at_the_very_start_and_single_string_stop() -> None:
    tok = CharTokenizer(["<", "end", ">", "x"])
    detok = IncrementalDetokenizer(tok, stop="<end>")
    assert [detok.push(t) for t in tok.ids("<", "end", ">", "x")] == ["", "", "", ""]
    assert detok.stopped and detok.text == "" and detok.stop_reason == "<end>"


def reference_stop(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Character-by-character: cut at the first stop string to complete (longest if several)."""
    for end in range(1, len(text) + 1):
        done = [stop for stop in stops if text[:end].endswith(stop)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


def test_stop_matching_is_independent_of_token_splits() -> None:
    pieces = ["a", "b", "c", " ", "ab", "ba", "bc", "abc", "cab", "b a", "ca"]
    tok = CharTokenizer(pieces)
    rng = random.Random(1234)
    for _ in range(1500):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randrange(1, 12))]
        stops = ["".join(rng.choice("abc ") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 4))]
        text = tok.decode(ids)
        expected_text, expected_stop = reference_stop(text, stops)
        detok = IncrementalDetokenizer(tok, stop=stops)
        emitted = ""
        for token in ids:
            emitted += detok.push(token)
            assert expected_text.startswith(emitted), (ids, stops)
        emitted += detok.flush()
        assert emitted == expected_text == detok.text, (text, stops)
        assert detok.stopped == (expected_stop is not None)
        assert detok.stop_reason == expected_stop


def test_non_ascii_stop_string(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "héllo wörld ✓ 日本語のテキスト"
    ids = encode(tokenizer, text)
    detok = IncrementalDetokenizer(tokenizer, stop=["日本", "zzz"])
    assert "".join(stream(detok, ids)) == "héllo wörld ✓ "
    assert detok.stop_reason == "日本"


# -- misuse ---------------------------------------------------------------------


def test_rejects_bad_arguments(byte_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="stop\\[1\\]"):
        IncrementalDetokenizer(byte_tokenizer, stop=["ok", ""])
    detok = IncrementalDetokenizer(byte_tokenizer)
    with pytest.raises(TypeError, match="integers"):
        detok.push("5")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="integers"):
        detok.push(True)
    with pytest.raises(ValueError, match=">= 0"):
        detok.push(-3)
    detok.push(5)
    detok.flush()
    with pytest.raises(RuntimeError, match="after flush"):
        detok.push(5)
    assert detok.flush() == ""


def test_the_rust_decoder_behind_a_fast_tokenizer_gives_the_wrappers_text():
    import random
    from pathlib import Path

    from transformers import AutoTokenizer

    from kiln.runtime.detokenizer import _backend_decoder

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[2] / "demo" / "tiny-kiln")
    backend = _backend_decoder(tok)
    assert backend is not None
    rng = random.Random(7)
    specials = list(tok.all_special_ids)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))] + rng.sample(specials, 1)
        rng.shuffle(ids)
        for skip in (True, False):
            assert backend.decode(ids, skip_special_tokens=skip) == tok.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
            )

    class Overrides(type(tok)):  # a class that changes decoding keeps the wrapper's path
        def _decode(self, *args, **kwargs):
            return "x"

    overriding = Overrides.from_pretrained(Path(__file__).resolve().parents[2] / "demo" / "tiny-kiln")
    assert overriding.backend_tokenizer is not None and _backend_decoder(overriding) is None
