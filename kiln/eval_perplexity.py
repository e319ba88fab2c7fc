"""`kiln eval`: an engine's perplexity over a local text file, from its prompt log-probabilities.

The text is tokenized once with the engine's tokenizer (as a prompt: with its special tokens, such
as a BOS in front) and cut into consecutive, non-overlapping windows of at most `window` tokens
(default: the engine's max_input_len). Each window is one request with `prompt_logprobs`; every
token but a window's first is scored, so a window sees no context before its own start.
With a checkpoint, transformers scores exactly the same windows (the engine's dtype and device).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError, RequestError


@dataclass(frozen=True)
class EvalOptions:
    engine: str
    text: str  # path of the text file
    compare_hf: str | None = None  # a checkpoint directory
    max_tokens: int | None = None  # evaluate only the text's first N tokens
    window: int | None = None  # tokens per window (default and upper bound: the engine's max_input_len)
    progress: bool = True


@dataclass(frozen=True)
class PerplexityResult:
    engine: str
    tokens: int  # tokens scored
    windows: int
    window: int  # tokens per window (the last may be shorter)
    nll: float  # mean negative log-likelihood per scored token (nats)
    perplexity: float
    hf_nll: float | None = None
    hf_perplexity: float | None = None
    ratio: float | None = None  # perplexity / hf_perplexity
    quantization: Any = None  # the engine manifest's quantization entry, where it has one

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def read_text(path: str | Path) -> str:
    file = Path(path)
    if not file.is_file():
        raise KilnError(f"--text {file}: no such file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise KilnError(f"--text {file} is not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise KilnError(f"--text {file} is empty: give a file with some text to score")
    return text


def split_windows(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of at most `window` ids; a last window of one id (nothing to
    score) is dropped."""
    if window < 2:
        raise KilnError(f"a window needs at least 2 tokens (one scored), got {window}")
    windows = [list(ids[i : i + window]) for i in range(0, len(ids), window)]
    return [w for w in windows if len(w) >= 2]


def quantization_of(engine_dir: str | Path) -> Any:
    """The manifest's quantization block (method, bits, group size, layers), or None for a dense engine."""
    data = json.loads((Path(engine_dir) / "manifest.json").read_text())
    return data.get("quantization")


def engine_nll(llm: Any, windows: list[list[int]], advance: Callable[[int], None]) -> float:
    """The summed negative log-likelihood of every window's tokens after its first, scored by the engine."""
    from kiln.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    batch = max(1, llm.engine.build.max_batch_size)
    total = 0.0
    for begin in range(0, len(windows), batch):
        chunk = windows[begin : begin + batch]
        try:
            outputs = llm.generate(chunk, params)
        except RequestError as exc:
            raise KilnError(f"the engine refused a window of the text: {exc}") from exc
        for ids, out in zip(chunk, outputs):
            scored = out.prompt_logprobs
            if scored is None or len(scored) != len(ids) or any(e is None for e in scored[1:]):
                raise KilnError(
                    f"engine {llm.engine.path} returned no prompt log-probabilities; "
                    "rebuild it with this kiln (`kiln build`) to evaluate it"
                )
            total -= sum(e.logprob for e in scored[1:])
        advance(len(chunk))
    return total


def check_checkpoint(path: str | Path) -> Path:
    checkpoint = Path(path)
    if not (checkpoint / "config.json").is_file():
        raise KilnError(f"--compare-hf {checkpoint} is not a checkpoint directory (no config.json)")
    return checkpoint


def hf_nll(
    checkpoint: Path, windows: list[list[int]], dtype: Any, device: str, advance: Callable[[int], None]
) -> float:
    """The same sum as `engine_nll`, by transformers on `checkpoint` (float32 log-softmax)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="eager")
    model = model.to(device).eval()
    total = 0.0
    with torch.no_grad():
        for ids in windows:
            tokens = torch.tensor([ids], device=device)
            logits = model(tokens).logits[0, :-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            total -= float(log_probs.gather(1, tokens[0, 1:, None]).sum())
            advance(1)
    return total


@dataclass(frozen=True)
class _EngineScore:
    windows: list[list[int]]
    window: int
    nll_sum: float
    dtype: str  # the engine's, for transformers
    device: str


def _score_engine(options: EvalOptions, text: str, bar: Any, runtime: dict[str, Any]) -> _EngineScore:
    from kiln.api import LLM

    llm = LLM(options.engine, progress=options.progress, **runtime)
    build = llm.engine.build
    limit = min(build.input_len, build.seq_len - 1)  # max_tokens=1 must still fit
    window = limit if options.window is None else options.window
    if window > limit:
        raise KilnError(f"--window {window} is longer than this engine's prompts can be ({limit} tokens)")
    ids = llm.encode(text)[: options.max_tokens]
    windows = split_windows(ids, window)
    if not windows:
        raise KilnError(f"--text {options.text} has {len(ids)} token(s): nothing to score (at least 2 are needed)")
    task = bar.add_task("kiln windows", total=len(windows))
    nll_sum = engine_nll(llm, windows, lambda n: bar.advance(task, n))
    return _EngineScore(windows, window, nll_sum, build.dtype, str(llm.engine.device))


def evaluate(options: EvalOptions, **runtime: Any) -> PerplexityResult:
    """Score the text with the engine, then (with `compare_hf`) with transformers once the engine is
    released (on a GPU its KV pool holds most of the memory)."""
    import gc

    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    from kiln.config import torch_dtype
    from kiln.progress import Progress

    text = read_text(options.text)
    checkpoint = check_checkpoint(options.compare_hf) if options.compare_hf is not None else None
    if options.max_tokens is not None and options.max_tokens < 2:
        raise KilnError(f"--max-tokens must be at least 2, got {options.max_tokens}")
    if options.window is not None:
        split_windows([], options.window)  # refuses a window under 2 before the engine loads
    stages = Progress(enabled=options.progress)
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    shown = options.progress and stages.console.is_terminal
    with Bar(*columns, console=stages.console, transient=True, disable=not shown) as bar:
        score = _score_engine(options, text, bar, runtime)
        gc.collect()  # the engine, and its KV pool, are gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        hf = None
        if checkpoint is not None:
            task = bar.add_task("transformers windows", total=len(score.windows))
            dtype = torch_dtype(score.dtype)
            hf = hf_nll(checkpoint, score.windows, dtype, score.device, lambda n: bar.advance(task, n))
    scored = sum(len(w) - 1 for w in score.windows)
    stages.note(f"{scored} tokens scored in {len(score.windows)} window(s) of at most {score.window}")
    nll = score.nll_sum / scored
    hf_mean = hf / scored if hf is not None else None
    return PerplexityResult(
        engine=str(options.engine),
        tokens=scored,
        windows=len(score.windows),
        window=score.window,
        nll=nll,
        perplexity=math.exp(nll),
        hf_nll=hf_mean,
        hf_perplexity=math.exp(hf_mean) if hf_mean is not None else None,
        ratio=math.exp(nll - hf_mean) if hf_mean is not None else None,
        quantization=quantization_of(options.engine),
    )


def summary(result: PerplexityResult) -> str:
    lines = [
        f"perplexity {result.perplexity:.4f} (nll {result.nll:.5f}) over {result.tokens} tokens, "
        f"{result.windows} window(s) of at most {result.window}"
    ]
    if result.hf_perplexity is not None:
        lines.append(f"transformers perplexity {result.hf_perplexity:.4f}; kiln / transformers {result.ratio:.5f}")
    if result.quantization:
        lines.append(f"quantization: {result.quantization}")
    return "\n".join(lines)
