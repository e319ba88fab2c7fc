"""The larger-model path of `train_demo.py` (`--corpus pysource`, or `--device cuda`).

What differs from the demo path: the training text is one token stream sampled in random
`--seq-len` windows (documents may be far longer than a window); on CUDA the forward and backward run
under bf16 autocast with float32 master weights and a fused AdamW; `--max-minutes` fixes the number of
steps from the measured step time, so the cosine schedule ends inside the budget; the held-out text is
scored the way `kiln eval --window SEQ_LEN` scores it (tokenized whole, non-overlapping windows), with
the weights rounded to `--save-dtype` first, so the number is the saved checkpoint's.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CALIBRATION_STEPS = (5, 25)  # with --max-minutes: the step time is measured between these steps


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    tokens_seen: int
    last_loss: float  # training loss of the last step (a sample of one batch)
    steps_per_second: float


class WindowSampler:
    """Random `seq_len`-token windows of a token stream (start anywhere, wrapping at its end)."""

    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int, device: torch.device) -> None:
        self.stream = stream.to(device=device, dtype=torch.long)
        self.offsets = torch.arange(seq_len, device=device)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device

    def __call__(self, batch: int) -> torch.Tensor:
        n = self.stream.numel()
        starts = torch.randint(0, n, (batch, 1), generator=self.generator).to(self.device)
        return self.stream[(starts + self.offsets) % n]


def _optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def _lr(step: int, total: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine down to a tenth of --lr at step `total`."""
    if step < args.warmup:
        return float(args.lr * (step + 1) / args.warmup)
    frac = min(1.0, (step - args.warmup) / max(1, total - args.warmup))
    return float(args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    model: torch.nn.Module,
    sampler: WindowSampler,
    args: argparse.Namespace,
    log: Callable[[str], None],
    heldout: Callable[[], float] | None = None,
) -> TrainResult:
    """AdamW over random windows until --max-steps, or the step count --max-minutes allows; every
    --eval-every steps, logs `heldout()` (a watch on over-fitting: nothing is chosen by it)."""
    device = sampler.device
    opt = _optimizer(model, args, device)
    amp = device.type == "cuda"  # bf16 autocast on CUDA; the CPU dry run stays in float32
    total = args.max_steps
    budget = args.max_minutes * 60.0 if args.max_minutes is not None else None
    model.train()
    t0 = time.time()
    mark = t0
    step, loss = 0, torch.zeros(())
    while step < total:
        step += 1
        for group in opt.param_groups:
            group["lr"] = _lr(step - 1, total, args)
        batch = sampler(args.batch)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if budget is not None and step in CALIBRATION_STEPS:
            _sync(device)
            if step == CALIBRATION_STEPS[0]:
                mark = time.time()
            else:
                per_step = (time.time() - mark) / (CALIBRATION_STEPS[1] - CALIBRATION_STEPS[0])
                fits = step + int((budget - (time.time() - t0)) / per_step)
                total = max(step, min(args.max_steps, fits))
                log(f"step time {per_step * 1000:.1f} ms: {total} steps fit in {args.max_minutes:g} min")
        if step % args.log_every == 0 or step == 1 or step == total:
            log(
                f"step {step:6d}  loss {loss.item():.4f}  lr {_lr(step - 1, total, args):.2e}  {time.time() - t0:7.1f}s"
            )
        if heldout is not None and step % args.eval_every == 0 and step < total:
            log(f"           held-out loss {heldout():.4f}")
        if budget is not None and time.time() - t0 > budget * 1.1:
            log(f"WARNING: stopping at step {step} of {total}, past the budget (the schedule did not finish)")
            break
    _sync(device)
    seconds = time.time() - t0
    return TrainResult(step, seconds, step * args.batch * args.seq_len, float(loss.item()), step / seconds)


@torch.no_grad()
def window_loss(
    model: torch.nn.Module, ids: list[int], window: int, device: torch.device, batch: int = 32
) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping `window`-token windows (a window's first token unscored),
    float32 with no autocast; also the number of scored tokens."""
    model.eval()
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    total, count = 0.0, 0
    for length in sorted({len(w) for w in windows}):  # full windows, then the shorter last one
        same = [w for w in windows if len(w) == length]
        for i in range(0, len(same), batch):
            x = torch.tensor(same[i : i + batch], device=device)
            logits = model(input_ids=x).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
            count += x[:, 1:].numel()
    model.train()
    return total / count, count


def unigram_loss(train_stream: torch.Tensor, heldout_ids: list[int], vocab: int) -> float:
    """Held-out loss of an add-one smoothed unigram model of the training tokens."""
    counts = torch.bincount(train_stream.long(), minlength=vocab).double()
    logp = torch.log((counts + 1) / (counts.sum() + vocab))
    return float(-logp[torch.tensor(heldout_ids[1:])].mean())


def round_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Round every float32 parameter to `dtype` and back, in place: what a checkpoint saved in it holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(p.dtype))


# ---- the whole run ---------------------------------------------------------------------------------


def corpus_documents(args: argparse.Namespace) -> tuple[list[str], dict]:
    """The run's documents and a description of where they came from (for training_info.json)."""
    import importlib.metadata
    import platform

    from train_corpus import SOURCE_CORPUS, load_sources, load_topics

    if args.corpus != SOURCE_CORPUS:
        return load_topics(args.corpus), {"name": args.corpus}
    packages = tuple(p for p in args.corpus_packages.split(",") if p)
    docs, counts = load_sources(packages)
    dists = importlib.metadata.packages_distributions()  # import name -> distributions, nothing imported
    versions = {name: importlib.metadata.version(dists[name][0]) if name in dists else "unknown" for name in packages}
    info = {"name": SOURCE_CORPUS, "python": platform.python_version(), "documents": counts, "packages": versions}
    return docs, info


def run(
    args: argparse.Namespace,
    train_tokenizer: Callable,
    build_model: Callable,
    save: Callable,
    log: Callable[[str], None],
) -> dict:
    """Corpus, split, tokenizer, training, held-out score and save; returns training_info."""
    from train_corpus import calibration_text, pick_documents, split_heldout

    device = torch.device(args.device)
    docs, corpus = corpus_documents(args)
    train_docs, held_docs = split_heldout(docs, args.heldout_fraction, args.seed)
    if not held_docs:
        raise SystemExit("this training path scores held-out text: give --heldout-fraction > 0")
    chars = sum(len(d) for d in train_docs)
    log(
        f"corpus: {len(docs)} documents ({corpus.get('documents', '')}); {len(train_docs)} train ({chars / 1e6:.1f} MB)"
    )
    tok_docs = (
        train_docs if args.tokenizer_chars is None else pick_documents(train_docs, args.tokenizer_chars, args.seed)
    )
    t0 = time.time()
    tok = train_tokenizer(tok_docs, args.vocab_size)
    encoded = tok(train_docs, add_special_tokens=True, return_attention_mask=False)["input_ids"]  # <|bos|> first
    stream = torch.tensor([t for ids in encoded for t in ids + [tok.eos_token_id]], dtype=torch.int32)
    del encoded
    small = [d for d in held_docs if len(d) <= args.heldout_chars // 4] or held_docs  # at most ~1.25x the length
    heldout = "\n\n".join(pick_documents(small, args.heldout_chars, args.seed)) + "\n"
    held_ids = tok(heldout, add_special_tokens=True)["input_ids"]  # as kiln eval tokenizes the file
    log(
        f"tokenizer: {len(tok)} tokens; train stream {stream.numel():,d} tokens; "
        f"held-out {len(held_ids):,d} ({time.time() - t0:.0f}s)"
    )

    torch.manual_seed(args.seed)
    model = build_model(tok, args).to(device)
    # Room for a whole --seq-len window as one prompt (a kiln engine's prompts stop one below max_seq_len);
    # the default rotary embedding computes every position, so this changes no weight and no output.
    model.config.max_position_embeddings = max(512, 2 * args.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,d} parameters on {device}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    sampler = WindowSampler(stream, args.seq_len, args.seed, device)
    result = train(model, sampler, args, log, lambda: window_loss(model, held_ids, args.seq_len, device)[0])
    torch.backends.cuda.matmul.allow_tf32 = False  # score in plain float32

    save_dtype = getattr(torch, args.save_dtype)
    round_weights(model, save_dtype)
    loss, scored = window_loss(model, held_ids, args.seq_len, device)
    unigram = unigram_loss(stream, held_ids, len(tok))
    bits_per_char = loss * scored / len(heldout) / math.log(2)
    log(
        f"held-out: {scored:,d} tokens in {args.seq_len}-token windows; loss {loss:.4f} (ppl {math.exp(loss):.1f}, "
        f"{bits_per_char:.3f} bits/char) vs unigram {unigram:.4f} (ppl {math.exp(unigram):.1f})"
    )
    if args.heldout_out is not None:
        args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
        args.heldout_out.write_text(heldout, encoding="utf-8")
    if args.calib_out is not None:
        args.calib_out.parent.mkdir(parents=True, exist_ok=True)
        args.calib_out.write_text(calibration_text(train_docs, args.calib_chars, args.seed), encoding="utf-8")

    import transformers

    info = {
        "script": "scripts/train_demo.py",
        "args": {
            k: (str(v) if not isinstance(v, (int, float, str, type(None))) else v)
            for k, v in sorted(vars(args).items())
        },
        "corpus": corpus,
        "parameters": n_params,
        "tokenizer_vocab_size": len(tok),
        "train_tokens": stream.numel(),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "epochs": round(result.tokens_seen / stream.numel(), 2),
        "train_seconds": round(result.seconds, 1),
        "last_train_loss": round(result.last_loss, 4),
        "heldout_chars": len(heldout),
        "heldout_tokens_scored": scored,
        "heldout_window": args.seq_len,
        "heldout_loss": round(loss, 4),
        "heldout_bits_per_char": round(bits_per_char, 4),
        "heldout_unigram_loss": round(unigram, 4),
        "saved_dtype": args.save_dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    model.to(device="cpu", dtype=save_dtype)
    save(model, tok, args.out, info, dtype=args.save_dtype, max_shard_size=args.max_shard_size)
    return info
