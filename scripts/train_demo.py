#!/usr/bin/env python3
"""Train the tiny embedded demo checkpoint shipped in ``demo/tiny-kiln``.

The checkpoint is a very small Llama-architecture model that memorises
``demo/corpus.txt`` (a short text written for this repository).  It exists so
that ``kiln build demo/tiny-kiln -o engines/demo`` and ``kiln run`` can be tried
on a fresh machine without downloading anything.

Steps:
  1. train a byte-level BPE tokenizer (``tokenizers``) on the corpus and wrap
     it as ``transformers.PreTrainedTokenizerFast`` with a chat template;
  2. build a small ``LlamaForCausalLM`` (grouped-query attention, tied
     embeddings) and train it on CPU with AdamW on random 128-token windows;
  3. save weights (float32 safetensors), config, generation config and
     tokenizer files, then print a few greedy samples.

Everything is seeded, so re-running the script reproduces the same files
(on the same torch version and thread count).

Usage:
    python scripts/train_demo.py                    # writes demo/tiny-kiln
    python scripts/train_demo.py --out /tmp/tiny    # somewhere else

``--corpus pydoc`` trains on the Python documentation shipped with Python
(``pydoc_data.topics``) instead; ``--heldout-fraction`` then keeps whole topics
out of tokenizer and model training and writes them to ``--heldout-out``, and
``--calib-out`` writes calibration text drawn from the training split (the
quantization-accuracy checkpoint in benchmarks/RESULTS.md is made this way).

``--corpus pysource`` (or ``--device cuda``) takes the larger-model path of
``scripts/train_large.py``: the pydoc topics plus the ``.py`` files of the
standard library and of ``--corpus-packages``, random ``--seq-len`` windows,
bf16 autocast on CUDA, a ``--max-minutes`` budget, the held-out text scored as
``kiln eval --window SEQ_LEN`` scores it (``scripts/device_train_acc.sh`` runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

# Must be set before ``tokenizers`` is imported / used.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_corpus import PYDOC_CORPUS, SOURCE_CORPUS, calibration_text, load_topics, split_heldout  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "demo" / "corpus.txt"
DEFAULT_OUT = REPO_ROOT / "demo" / "tiny-kiln"

BOS, EOS, USER, ASSISTANT, END = "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT, END]

# Renders exactly the layout used by the chat examples in demo/corpus.txt:
#   <|bos|><|user|>\n{q}<|end|>\n<|assistant|>\n{a}<|end|>\n
# System messages are ignored (the model never saw any); other roles raise.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'system' %}"
    "{% else %}"
    "{{ raise_exception('tiny-kiln chat template only supports user/assistant/system roles') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

SEQ_LEN = 128


def log(msg: str) -> None:
    print(msg, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def split_documents(text: str) -> list[str]:
    """Documents are separated by blank lines.

    Chat exchanges keep the trailing newline that the chat template renders
    after the final ``<|end|>``; plain paragraphs are stripped.
    """
    docs = []
    for block in text.split("\n\n"):
        block = block.strip("\n")
        if not block:
            continue
        if block.startswith(USER):
            block += "\n"
        docs.append(block)
    return docs


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Do not let BPE learn merges inside the special-token strings.
    plain = []
    for d in docs:
        for s in SPECIAL_TOKENS:
            d = d.replace(s, "\n")
        plain.append(d)
    tok.train_from_iterator(plain, trainer=trainer)

    bos_id = tok.token_to_id(BOS)
    # Plain-text encoding (add_special_tokens=True) prepends <|bos|>, the way
    # every training document starts.  The chat template writes bos itself and
    # apply_chat_template encodes with add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, bos_id)],
    )

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[USER, ASSISTANT, END],
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def encode_document(tok: PreTrainedTokenizerFast, doc: str) -> list[int]:
    ids = tok(doc, add_special_tokens=True)["input_ids"]  # starts with <|bos|>
    assert ids[0] == tok.bos_token_id, "tokenizer did not prepend <|bos|>"
    return ids + [tok.eos_token_id]


# ----------------------------------------------------------------------------
# Model / training
# ----------------------------------------------------------------------------


def build_model(tok: PreTrainedTokenizerFast, args: argparse.Namespace) -> LlamaForCausalLM:
    end_id = tok.convert_tokens_to_ids(END)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        initializer_range=0.02,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end_id],
        pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    config.dtype = torch.float32
    model = LlamaForCausalLM(config).to(torch.float32)
    return model


def make_sampler(docs_ids: list[list[int]], seed: int):
    """Random SEQ_LEN-token windows over the document
    stream.  Half of the windows start exactly at a document's <|bos|>, which
    matches how prompts look at inference time; the rest start anywhere."""
    stream: list[int] = [t for d in docs_ids for t in d]
    starts: list[int] = []
    pos = 0
    for d in docs_ids:
        starts.append(pos)
        pos += len(d)
    n = len(stream)
    # Circular stream so any start yields a full window.
    looped = stream * (SEQ_LEN // n + 2)
    rng = random.Random(seed)

    def sample(batch: int) -> torch.Tensor:
        rows = []
        for i in range(batch):
            s = rng.choice(starts) if i % 2 == 0 else rng.randrange(n)
            rows.append(looped[s : s + SEQ_LEN])
        return torch.tensor(rows, dtype=torch.long)

    return sample, n


@torch.no_grad()
def corpus_loss(model: LlamaForCausalLM, docs_ids: list[list[int]]) -> float:
    """Mean next-token loss over every document, each encoded on its own."""
    model.eval()
    total, count = 0.0, 0
    for ids in docs_ids:
        x = torch.tensor([ids], dtype=torch.long)
        out = model(input_ids=x, labels=x)
        k = len(ids) - 1
        total += out.loss.item() * k
        count += k
    model.train()
    return total / count


def train(model, docs_ids, args) -> tuple[float, int, float]:
    sample, n_tokens = make_sampler(docs_ids, args.seed)
    log(f"corpus: {len(docs_ids)} documents, {n_tokens} tokens (with bos/eos)")

    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.max_steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    model.train()
    t0 = time.time()
    ema = None
    eval_loss = float("nan")
    step = 0
    for step in range(1, args.max_steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        batch = sample(args.batch)
        # ``labels`` are shifted by one inside the model.
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        elapsed = time.time() - t0
        if step % args.log_every == 0 or step == 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  ema {ema:.4f}  lr {lr_at(step - 1):.2e}  {elapsed:6.1f}s")
        if step % args.eval_every == 0:
            eval_loss = corpus_loss(model, docs_ids)
            log(f"           corpus loss {eval_loss:.4f}")
            if eval_loss < args.target_loss:
                log(f"reached target corpus loss {args.target_loss} at step {step}")
                break
        if elapsed > args.max_seconds:
            log(
                f"WARNING: stopping at the {args.max_seconds:.0f}s wall-clock cap (step {step}); "
                "the result is not reproducible bit-for-bit when this cap triggers"
            )
            break
    train_time = time.time() - t0
    eval_loss = corpus_loss(model, docs_ids)
    log(f"final corpus loss {eval_loss:.4f} after {step} steps, {train_time:.1f}s")
    return eval_loss, step, train_time


# ----------------------------------------------------------------------------
# Saving / samples
# ----------------------------------------------------------------------------


def save(model, tok, out: Path, meta: dict, dtype: str = "float32", max_shard_size: str | None = None) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    end_id = tok.convert_tokens_to_ids(END)

    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, end_id],
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    if max_shard_size is None:
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    tok.save_pretrained(out)

    # Also write the pre-v5 spellings of two config keys, so readers that look
    # for ``torch_dtype`` / top-level ``rope_theta`` (older transformers
    # releases, hand-written loaders) find them too.  Both spellings agree.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dtype"] = dtype
    cfg["torch_dtype"] = dtype
    cfg["rope_theta"] = float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    (out / "training_info.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    total = 0
    for f in sorted(out.iterdir()):
        size = f.stat().st_size
        total += size
        log(f"  {f.name:28s} {size:>10,d} bytes")
    log(f"  {'total':28s} {total:>10,d} bytes ({total / 1e6:.2f} MB)")


PLAIN_PROMPTS = ["A kiln is", "A glaze is", "The first firing is called", "To build an engine,"]
CHAT_PROMPTS = ["What is a kiln?", "What is a glaze?", "What does cobalt do in a glaze?"]


@torch.no_grad()
def show_samples(model, tok, max_new_tokens: int = 40) -> None:
    model.eval()
    log("\n=== greedy samples (plain) ===")
    for p in PLAIN_PROMPTS:
        enc = tok(p, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        log(f"[{p}] -> {p}{text}")
    log("\n=== greedy samples (chat) ===")
    for q in CHAT_PROMPTS:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        log(f"[user: {q}] -> {text.strip()}")


def heldout_report(model, tok, heldout_topics: list[str], train_ids: list[list[int]], args) -> dict:
    """Held-out loss against a unigram model of the training tokens; writes --heldout-out."""
    held_docs = [d for t in heldout_topics for d in split_documents(t)]
    held_ids = [encode_document(tok, d) for d in held_docs]
    loss = corpus_loss(model, held_ids)
    counts = torch.bincount(torch.tensor([t for d in train_ids for t in d[1:]]), minlength=len(tok)).double()
    logp = torch.log((counts + 1) / (counts.sum() + len(tok)))  # add-one smoothed
    targets = torch.tensor([t for d in held_ids for t in d[1:]])
    unigram = float(-logp[targets].mean())
    log(
        f"held-out: {len(heldout_topics)} topics, {targets.numel()} tokens; loss {loss:.4f} "
        f"(ppl {math.exp(loss):.2f}) vs unigram {unigram:.4f} (ppl {math.exp(unigram):.2f})"
    )
    if args.heldout_out is not None:
        args.heldout_out.parent.mkdir(parents=True, exist_ok=True)
        args.heldout_out.write_text("\n\n".join(heldout_topics) + "\n", encoding="utf-8")
    return {
        "heldout_topics": len(heldout_topics),
        "heldout_loss": round(loss, 4),
        "heldout_unigram_loss": round(unigram, 4),
    }


LARGE_ONLY = {  # options of the larger-model path and their defaults
    "seq_len": 256,
    "max_minutes": None,
    "corpus_packages": "",
    "heldout_chars": 200_000,
    "tokenizer_chars": None,
    "save_dtype": "float32",
    "max_shard_size": None,
}


def add_large_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: bf16 autocast, fused AdamW")
    ap.add_argument("--seq-len", type=int, default=LARGE_ONLY["seq_len"], help="tokens per training window")
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="training budget: fixes the step count from the step time"
    )
    ap.add_argument(
        "--corpus-packages", default="", help="comma-separated installed packages whose .py files join the corpus"
    )
    ap.add_argument(
        "--heldout-chars", type=int, default=LARGE_ONLY["heldout_chars"], help="held-out text written and scored"
    )
    ap.add_argument("--tokenizer-chars", type=int, default=None, help="train the tokenizer on this much training text")
    ap.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-shard-size", default=None, help="save_pretrained's max_shard_size, e.g. 14MB")


def main_large(args: argparse.Namespace) -> int:
    from train_large import run

    if args.device == "cuda":
        torch.use_deterministic_algorithms(False)  # cuBLAS and SDPA's backward are not, and need not be
    info = run(args, train_tokenizer, build_model, save, log)
    if args.calib_out is not None:
        log(f"calibration text (training split) -> {args.calib_out}")
    keys = ("parameters", "train_tokens", "steps", "tokens_seen", "epochs", "train_seconds", "heldout_loss")
    log(json.dumps({k: info[k] for k in (*keys, "heldout_unigram_loss", "heldout_bits_per_char")}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--corpus",
        default=str(DEFAULT_CORPUS),
        help=f"training text file, '{PYDOC_CORPUS}' for Python's documentation topics, or '{SOURCE_CORPUS}' "
        "for those plus the .py files of the standard library and --corpus-packages (the larger-model path)",
    )
    ap.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.0,
        help="fraction of top-level documents (pydoc topics) kept out of all training",
    )
    ap.add_argument("--heldout-out", type=Path, default=None, help="write the held-out documents here")
    ap.add_argument("--calib-out", type=Path, default=None, help="write calibration text from the training split here")
    ap.add_argument("--calib-chars", type=int, default=20000, help="approximate length of --calib-out")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--vocab-size",
        type=int,
        default=768,
        help="BPE vocab upper bound (the small corpus runs out of merges at ~613)",
    )
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument(
        "--target-loss",
        type=float,
        default=0.0,
        help="stop early once the whole-corpus loss is below this (0 = never). "
        "Note the loss cannot go much below ~0.045: the first word after "
        "<|bos|> is a guess among the corpus's documents.",
    )
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="safety cap on training wall time (normally ~40 s on 2 idle cores); "
        "if it triggers, the result differs from the committed checkpoint",
    )
    add_large_options(ap)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if args.corpus == SOURCE_CORPUS or args.device != "cpu":
        return main_large(args)
    for name, default in LARGE_ONLY.items():
        if getattr(args, name) != default:
            ap.error(f"--{name.replace('_', '-')} is for --corpus {SOURCE_CORPUS} or --device cuda only")

    train_topics, heldout_topics = split_heldout(load_topics(args.corpus), args.heldout_fraction, args.seed)
    docs = [d for t in train_topics for d in split_documents(t)]
    tok = train_tokenizer(docs, args.vocab_size)
    log(
        f"tokenizer: {len(tok)} tokens; bos={tok.bos_token_id} eos={tok.eos_token_id} "
        f"end={tok.convert_tokens_to_ids(END)}"
    )
    docs_ids = [encode_document(tok, d) for d in docs]

    # Re-seed so model init does not depend on anything above.
    torch.manual_seed(args.seed)
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,d} parameters ({n_params * 4 / 1e6:.2f} MB in float32)")

    final_loss, steps, train_time = train(model, docs_ids, args)
    heldout = heldout_report(model, tok, heldout_topics, docs_ids, args) if heldout_topics else {}

    meta = {
        "script": "scripts/train_demo.py",
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out", "corpus", "max_seconds", "log_every", "heldout_out", "calib_out", "device", *LARGE_ONLY)
            and (heldout_topics or k not in ("heldout_fraction", "calib_chars"))
        },
        "corpus": "demo/corpus.txt" if args.corpus == str(DEFAULT_CORPUS) else args.corpus,
        "parameters": n_params,
        "tokenizer_vocab_size": len(tok),  # BPE stops below --vocab-size on this small corpus
        "steps": steps,
        "final_corpus_loss": round(final_loss, 4),
        "torch_version": torch.__version__,
        **heldout,
    }
    log(f"\nsaving to {args.out}")
    save(model, tok, args.out, meta)
    if args.calib_out is not None:
        args.calib_out.parent.mkdir(parents=True, exist_ok=True)
        args.calib_out.write_text(calibration_text(docs, args.calib_chars, args.seed), encoding="utf-8")
        log(f"calibration text (training split) -> {args.calib_out}")
    if args.corpus == str(DEFAULT_CORPUS):
        show_samples(model, tok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
