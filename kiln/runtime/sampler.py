"""Turn one decoding step's logits into next tokens, one `SamplingParams` per row.

Entry points:

* `make_generator(seed, device)`: the per-request RNG the caller keeps for the
  whole request (None when the request has no seed).
* `sample(logits, params, histories, generated, generators)`: returns the
  next token of every row as a ``[B]`` int64 tensor on the logits' device, and
  the requested log-probs (or None when no row asked for any).

Per row, in this order:

1. penalties: repetition penalty (Hugging Face rule) over ``histories[i]``
   (prompt + generated ids), then presence and frequency penalties (OpenAI
   rule) over ``generated[i]`` only, then ``logit_bias`` (`kiln.runtime.logits_processors`);
2. greedy rows (temperature 0): ``torch.argmax``, so ties go to the lowest id (a batch of
   greedy rows with no penalty and no log-probs: `kiln.kernels.argmax`, the same indices
   from a parallel kernel on CUDA, without the float32 copy);
3. other rows: divide by the temperature, keep the top-k, then the top-p
   nucleus, then drop tokens below ``min_p`` times the top token's
   probability, and draw with ``torch.multinomial(probs, 1, generator=g)``.

All maths runs in float32 on the logits' device; the caller's tensor is never
modified. Greedy rows and unseeded sampled rows are handled in one batched
call each; a seeded row is drawn on its own so that its tokens depend only on
its seed and its logits, never on which other requests share the batch. The
only host synchronisation is the one needed to hand log-probs back as Python
numbers, and only when a row asked for them.

`SamplingParams` has validated every value already; this module only checks
what the caller (the engine) could get wrong: shapes, lengths, token ids in
range, generator devices. Those are programming errors and raise `ValueError`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kiln.kernels.argmax import argmax_rows
from kiln.runtime.logits_processors import apply_logit_bias
from kiln.sampling_params import SamplingParams


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities reported for one sampled token.

    Computed from the log-softmax of the logits *after* penalties, logit_bias
    and a grammar's mask but *before*
    temperature, top-k, top-p and min-p, i.e. the model's (penalised)
    distribution rather than the truncated one the token was drawn from.

    Attributes:
        token_id: the sampled token.
        logprob: its log-probability.
        top: the ``logprobs`` most likely tokens as ``(token_id, logprob)``
            pairs, most likely first (empty when ``logprobs`` is 0).
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """Return a generator on ``device`` seeded with ``seed``, or None when ``seed`` is None.

    Make one per request when it arrives and pass the same object to every
    `sample` call for that request: the sequence of tokens then depends only on
    the seed (and the logits), so the same seed gives the same tokens.
    """
    if seed is None:
        return None
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, list[TokenLogprobs | None] | None]:
    """Pick the next token of each row of ``logits``.

    Args:
        logits: ``[B, V]`` floating tensor on any device (any float dtype; the
            maths is done in float32). Not modified.
        params: one `SamplingParams` per row.
        histories: per row, the prompt ids followed by the ids generated so far
            (used by the repetition penalty).
        generated: per row, the ids generated so far only (used by the presence
            and frequency penalties).
        generators: per row, the request's generator from `make_generator` (on
            the logits' device), or None to use torch's global RNG.

    Returns:
        ``(tokens, logprobs)``: ``tokens`` is a ``[B]`` int64 tensor on the
        logits' device. ``logprobs`` is None when no row set
        ``params[i].logprobs``; otherwise a list of length B holding a
        `TokenLogprobs` for each row that asked (None for the others), computed
        from the log-softmax of the penalised logits before temperature, top-k,
        top-p and min-p filtering.

    Raises:
        ValueError: shapes or lengths disagree, a history holds an id outside
            ``[0, V)``, or a generator lives on another device than the logits.
    """
    _check_inputs(logits, params, histories, generated, generators)
    batch, vocab = logits.shape
    device = logits.device
    if batch == 0:
        return torch.empty(0, dtype=torch.int64, device=device), None
    if all(_plain_greedy(p) for p in params):
        # argmax is exact in the logits' own dtype: no float32 copy, one parallel reduction.
        return argmax_rows(logits), None

    scores = logits.to(torch.float32, copy=True)
    _apply_penalties(scores, params, histories, generated)
    apply_logit_bias(scores, params)

    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    greedy_rows = [row for row, p in enumerate(params) if p.greedy]
    sampled_rows = [row for row, p in enumerate(params) if not p.greedy]

    if len(greedy_rows) == batch:
        tokens = torch.argmax(scores, dim=-1)
    elif greedy_rows:
        greedy_index = _device_tensor(greedy_rows, torch.int64, device)
        tokens.index_copy_(0, greedy_index, torch.argmax(scores.index_select(0, greedy_index), dim=-1))

    if sampled_rows:
        row_params = [params[row] for row in sampled_rows]
        if len(sampled_rows) == batch:
            index: torch.Tensor | None = None
            subset = scores
        else:
            index = _device_tensor(sampled_rows, torch.int64, device)
            subset = scores.index_select(0, index)
        temperatures = _device_tensor([p.temperature for p in row_params], torch.float32, device)
        probs = _filtered_probs(subset / temperatures.unsqueeze(1), row_params)
        drawn = _draw(probs, [generators[row] for row in sampled_rows])
        if index is None:
            tokens = drawn
        else:
            tokens.index_copy_(0, index, drawn)

    return tokens, _logprobs(scores, tokens, params)


def _plain_greedy(p: SamplingParams) -> bool:
    """Greedy with nothing that needs the float32 scores: no penalty, no bias, no log-probs."""
    return (
        p.greedy
        and p.logprobs is None
        and not p.logit_bias
        and p.repetition_penalty == 1.0
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
    )


def _check_inputs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator | None],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [batch, vocab], got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    batch, vocab = logits.shape
    if vocab == 0 and batch > 0:
        raise ValueError("logits have an empty vocabulary dimension")
    for name, values in (
        ("params", params),
        ("histories", histories),
        ("generated", generated),
        ("generators", generators),
    ):
        if len(values) != batch:
            raise ValueError(f"{name} has {len(values)} entries but logits have {batch} rows")
    for row, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params[{row}] must be a SamplingParams, got {type(p).__name__}")
    device = logits.device
    for row, generator in enumerate(generators):
        if generator is None:
            continue
        gen_device = generator.device
        if gen_device.type != device.type or (
            device.index is not None and gen_device.index is not None and gen_device.index != device.index
        ):
            raise ValueError(
                f"generators[{row}] is on {gen_device} but logits are on {device};"
                f" create it with make_generator(seed, logits.device)"
            )


def _device_tensor(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Copy a small host list to ``device`` without making the host wait for the GPU."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        # From pinned memory the copy is truly asynchronous; torch's host allocator
        # keeps the pinned block alive until the copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _valid_ids(ids: Sequence[int], vocab: int, what: str, row: int) -> list[int]:
    """Distinct ids of one row, checked to index the vocabulary."""
    distinct = list(set(ids))
    if distinct and (min(distinct) < 0 or max(distinct) >= vocab):
        bad = min(distinct) if min(distinct) < 0 else max(distinct)
        raise ValueError(f"{what}[{row}] holds token id {bad}, outside the logits' vocabulary [0, {vocab})")
    return distinct


def _apply_penalties(
    scores: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
) -> None:
    """Apply repetition, then presence and frequency penalties to ``scores`` in place.

    Each kind is gathered over all rows into one flat list of (row, id) pairs
    and applied with a single indexed read-modify-write; the pairs are distinct
    so no index is written twice.
    """
    vocab = scores.shape[1]
    device = scores.device

    rows: list[int] = []
    cols: list[int] = []
    factors: list[float] = []
    for row, p in enumerate(params):
        if p.repetition_penalty == 1.0:
            continue
        ids = _valid_ids(histories[row], vocab, "histories", row)
        rows.extend([row] * len(ids))
        cols.extend(ids)
        factors.extend([p.repetition_penalty] * len(ids))
    if rows:
        row_index = _device_tensor(rows, torch.int64, device)
        col_index = _device_tensor(cols, torch.int64, device)
        factor = _device_tensor(factors, torch.float32, device)
        picked = scores[row_index, col_index]
        # Hugging Face's RepetitionPenaltyLogitsProcessor: shrink the logit towards 0.
        scores[row_index, col_index] = torch.where(picked < 0, picked * factor, picked / factor)

    rows, cols = [], []
    amounts: list[float] = []
    for row, p in enumerate(params):
        if p.presence_penalty == 0.0 and p.frequency_penalty == 0.0:
            continue
        counts = Counter(generated[row])
        _valid_ids(list(counts), vocab, "generated", row)
        for token, count in counts.items():
            rows.append(row)
            cols.append(token)
            amounts.append(p.presence_penalty + p.frequency_penalty * count)
    if rows:
        row_index = _device_tensor(rows, torch.int64, device)
        col_index = _device_tensor(cols, torch.int64, device)
        amount = _device_tensor(amounts, torch.float32, device)
        scores[row_index, col_index] = scores[row_index, col_index] - amount


def _filtered_probs(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities after top-k, top-p and min-p; filtered tokens get probability 0.

    ``scores`` are already divided by the temperature. The most likely token
    always survives, so every row keeps at least one token. Rows that disable a
    filter are left untouched by it, and the vocabulary is sorted only when some
    row uses top-k or top-p.
    """
    rows, vocab = scores.shape
    device = scores.device
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    use_top_k = any(k < vocab for k in top_ks)
    use_top_p = any(top_p < 1.0 for top_p in top_ps)

    if use_top_k or use_top_p:
        # Stable sort: among equal logits the lower id ranks first, as with argmax.
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
        removed = torch.zeros_like(sorted_scores, dtype=torch.bool)
        if use_top_k:
            k = _device_tensor(top_ks, torch.int64, device)
            ranks = torch.arange(vocab, device=device)
            removed |= ranks.unsqueeze(0) >= k.unsqueeze(1)
        if use_top_p:
            top_p = _device_tensor(top_ps, torch.float32, device).unsqueeze(1)
            sorted_probs = torch.softmax(sorted_scores.masked_fill(removed, float("-inf")), dim=-1)
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            # Keep the smallest prefix whose mass reaches top_p: a token goes once the tokens
            # ranked above it already hold top_p. Rows with top_p == 1 are exempt so float
            # rounding cannot trim their tail.
            removed |= (mass_before >= top_p) & (top_p < 1.0)
            # The top token always stays, even where a tiny top_p rounds to 0 in float32.
            removed[:, 0] = False
        sorted_scores = sorted_scores.masked_fill(removed, float("-inf"))
        scores = torch.empty_like(scores).scatter_(1, order, sorted_scores)

    probs = torch.softmax(scores, dim=-1)
    min_ps = [p.min_p for p in params]
    if any(min_p > 0.0 for min_p in min_ps):
        min_p = _device_tensor(min_ps, torch.float32, device).unsqueeze(1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        # torch.multinomial does not need the rows to sum to 1.
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per row: unseeded rows together, each seeded row alone."""
    rows = probs.shape[0]
    unseeded = [row for row, generator in enumerate(generators) if generator is None]
    if len(unseeded) == rows:
        return torch.multinomial(probs, 1).squeeze(1)
    drawn = torch.empty(rows, dtype=torch.int64, device=probs.device)
    if unseeded:
        index = _device_tensor(unseeded, torch.int64, probs.device)
        drawn.index_copy_(0, index, torch.multinomial(probs.index_select(0, index), 1).squeeze(1))
    for row, generator in enumerate(generators):
        if generator is not None:
            drawn[row : row + 1] = torch.multinomial(probs[row : row + 1], 1, generator=generator).squeeze(1)
    return drawn


def _logprobs(
    scores: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None] | None:
    """Log-probs of the penalised, untempered distribution for rows that asked for them."""
    wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return None
    device = scores.device
    index = _device_tensor(wanted, torch.int64, device)
    log_probs = torch.log_softmax(scores.index_select(0, index), dim=-1)
    chosen_ids = tokens.index_select(0, index)
    chosen = log_probs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1)
    most = min(max(params[row].logprobs or 0 for row in wanted), scores.shape[1])
    values = chosen.unsqueeze(1)
    ids = chosen_ids.unsqueeze(1)
    if most > 0:
        top_values, top_ids = torch.topk(log_probs, most, dim=-1)
        values = torch.cat([values, top_values], dim=1)
        ids = torch.cat([ids, top_ids], dim=1)

    # The host waits for the device only here: the values leave it as Python numbers.
    values_host = values.tolist()
    ids_host = ids.tolist()

    result: list[TokenLogprobs | None] = [None] * len(params)
    for position, row in enumerate(wanted):
        count = min(params[row].logprobs or 0, most)
        row_ids = ids_host[position]
        row_values = values_host[position]
        result[row] = TokenLogprobs(
            token_id=row_ids[0],
            logprob=row_values[0],
            top=tuple(zip(row_ids[1 : 1 + count], row_values[1 : 1 + count], strict=True)),
        )
    return result
