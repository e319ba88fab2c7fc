"""`kiln build`, `kiln run` and `kiln serve`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from kiln.errors import KilnError


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="build an engine directory from a Hugging Face checkpoint directory")
    p.add_argument("checkpoint", help="local checkpoint directory (config.json, *.safetensors, tokenizer files)")
    p.add_argument("-o", "--output", required=True, help="engine directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-input-len", type=int, default=None, help="longest prompt (default: min(1024, max-seq-len))")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="longest prompt + generated tokens (default: min(2048, the model's max_position_embeddings))",
    )
    p.add_argument("--max-num-tokens", type=int, default=2048, help="most tokens computed in one step")
    p.add_argument("--tokens-per-block", type=int, default=16, help="KV-cache block size in tokens")
    p.add_argument(
        "--no-compile", action="store_true", help="skip Inductor: the engine runs the captured graph op by op"
    )
    p.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code to run")


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="generate with an engine")
    p.add_argument("engine", help="engine directory written by `kiln build`")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--eager", action="store_true", help="run the captured graph op by op instead of the compiled one")
    _add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of streaming text")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized from memory)")
    p.add_argument(
        "--kv-cache-memory-fraction",
        type=float,
        default=0.9,
        help="on a GPU, the fraction of free memory (after loading) given to the KV-cache pool",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="never reuse cached blocks of earlier prompts")


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    runtime: dict[str, Any] = {
        "use_compiled": not args.eager,
        "kv_cache_memory_fraction": args.kv_cache_memory_fraction,
        "enable_prefix_caching": not args.no_prefix_caching,
    }
    if args.num_kv_blocks is not None:
        runtime["num_kv_blocks"] = args.num_kv_blocks
    return runtime


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve an engine over an OpenAI-compatible HTTP API")
    p.add_argument("engine", help="engine directory written by `kiln build`")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: the engine's directory name)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("KILN_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 routes (default: $KILN_API_KEY, else no key)",
    )
    p.add_argument("--max-body-bytes", type=int, default=8 * 2**20, help="largest request body accepted")
    p.add_argument(
        "--shutdown-timeout", type=int, default=10, help="seconds in-flight requests get to finish on SIGTERM"
    )
    p.add_argument("--eager", action="store_true", help="run the captured graph op by op instead of the compiled one")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_runtime_options(p)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln", description="Compile Hugging Face LLMs into inference engines and run them."
    )
    sub = p.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_run(sub)
    _add_serve(sub)
    return p


def cmd_build(args: argparse.Namespace) -> int:
    from kiln.api import build

    start = time.perf_counter()
    out = build(
        args.checkpoint,
        args.output,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len,
        max_num_tokens=args.max_num_tokens,
        tokens_per_block=args.tokens_per_block,
        compile=not args.no_compile,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"engine written to {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise KilnError(f"--prompt-ids takes comma-separated integers, got {text!r}") from exc


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kiln.api import LLM
    from kiln.sampling_params import SamplingParams

    if not args.prompt and not args.prompt_ids:
        raise KilnError("give at least one --prompt or --prompt-ids")
    err = Console(stderr=True)
    params = SamplingParams(
        max_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=tuple(args.stop_token_id),
        ignore_eos=args.ignore_eos,
    )
    start = time.perf_counter()
    llm = LLM(args.engine, progress=not args.json, **_runtime(args))
    load_s = time.perf_counter() - start
    prompts: list[Any] = []
    for text in args.prompt:
        prompts.append(llm.apply_chat_template([{"role": "user", "content": text}]) if args.chat else text)
    prompts += [_parse_ids(t) for t in args.prompt_ids]

    stream = not args.json and len(prompts) == 1
    if stream:
        shown = args.prompt[0] if args.prompt and not args.chat else ""
        print(shown, end="", flush=True)
    gen_start = time.perf_counter()
    outs = llm.generate(
        prompts, params, on_update=(lambda u: print(u.delta_text, end="", flush=True)) if stream else None
    )
    gen_s = time.perf_counter() - gen_start
    generated = sum(len(o.token_ids) for o in outs)
    if args.json:
        print(
            json.dumps(
                {
                    "engine": args.engine,
                    "load_s": round(load_s, 3),
                    "generate_s": round(gen_s, 3),
                    "tokens_per_s": round(generated / gen_s, 2) if gen_s > 0 else None,
                    "compiled": llm.engine.compiled,
                    "outputs": [
                        {
                            "prompt": o.prompt,
                            "prompt_token_ids": o.prompt_token_ids,
                            "token_ids": o.token_ids,
                            "text": o.text,
                            "finish_reason": o.finish_reason,
                            "stop_reason": o.stop_reason,
                            "metrics": {k: round(v, 4) for k, v in o.metrics.items()},
                        }
                        for o in outs
                    ],
                },
                indent=2,
            )
        )
        return 0
    if stream:
        print()
    else:
        for i, o in enumerate(outs):
            err.print(f"[bold]--- prompt {i}[/bold] ({len(o.prompt_token_ids)} tokens)")
            print((o.prompt or "") + o.text)
    ttft = min(o.metrics["time_to_first_token_s"] for o in outs)
    err.print(
        f"[dim]{len(outs)} prompt(s), {generated} tokens in {gen_s:.2f} s: {generated / gen_s:.1f} tokens/s; "
        f"first token after {ttft * 1000:.0f} ms; engine load {load_s:.1f} s "
        f"({'compiled' if llm.engine.compiled else 'eager'})[/dim]"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kiln.config import RuntimeConfig
    from kiln.serve.app import ServeSettings
    from kiln.serve.server import serve

    if not 0 <= args.port <= 65535:
        raise KilnError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1024:
        raise KilnError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.shutdown_timeout < 0:
        raise KilnError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    name = args.served_model_name or Path(args.engine).resolve().name
    settings = ServeSettings(model_name=name, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes)
    return serve(
        args.engine,
        host=args.host,
        port=args.port,
        settings=settings,
        runtime=RuntimeConfig.from_dict(_runtime(args)),
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return {"build": cmd_build, "run": cmd_run, "serve": cmd_serve}[args.command](args)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
