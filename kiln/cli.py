"""`kiln build`, `kiln run`, `kiln chat`, `kiln serve`, `kiln bench` and `kiln eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from kiln.cli_media import add_media_options, attach_media
from kiln.cli_options import add_options, values
from kiln.cli_quantization import add_aliases, resolve_aliases
from kiln.cli_sampling import add_sampling_options, sampling_from_args
from kiln.config import BuildConfig, RuntimeConfig
from kiln.errors import KilnError, RequestError
from kiln.version import __version__


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="build an engine directory from a Hugging Face checkpoint directory")
    p.add_argument("checkpoint", help="local checkpoint directory (config.json, *.safetensors, tokenizer files)")
    p.add_argument("-o", "--output", required=True, help="engine directory to write")
    add_options(p, BuildConfig)
    add_aliases(p)


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="generate with an engine")
    p.add_argument("engine", help="engine directory written by `kiln build`")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-ids", action="append", default=[], help="prompt as comma-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    add_sampling_options(p, max_new_tokens=64)
    _add_runtime_options(p)
    p.add_argument("--json", action="store_true", help="print machine-readable results instead of streaming text")
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="image file or data URL for the prompt (repeatable; the prompt has one image token per image)",
    )
    add_media_options(p)
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="with --image/--video: run the prompt this many times, the images and videos divided among the copies",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="print the latency per stage: preprocessing, vision encoder, generation, decode",
    )
    p.add_argument(
        "--check-accuracy",
        action="store_true",
        help="run transformers on the same inputs and report whether the greedy tokens match",
    )
    p.add_argument(
        "--checkpoint", default=None, help="for --check-accuracy: the checkpoint (default: the one built from)"
    )


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    add_options(p, RuntimeConfig)


def _runtime(args: argparse.Namespace) -> dict[str, Any]:
    return values(args, RuntimeConfig)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure latency and throughput, side by side with transformers")
    p.add_argument("engine", help="engine directory written by `kiln build`")
    p.add_argument("--compare-hf", default=None, metavar="CHECKPOINT", help="also time transformers on this checkpoint")
    p.add_argument(
        "--hf-systems",
        default="eager,static",
        help="transformers variants: eager and/or static (static cache, compiled where transformers compiles it: "
        "CUDA, not the CPU)",
    )
    p.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes for the latency runs")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens (synthetic ids)")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens per request (EOS ignored)")
    p.add_argument("--throughput", action="store_true", help="also submit --num-requests requests at once")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--output-dir", default="bench-results", help="where bench.json and bench.png go")
    _add_runtime_options(p)


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="perplexity of an engine over a text file (optionally beside transformers)")
    p.add_argument("engine", help="engine directory written by `kiln build`")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--compare-hf", default=None, metavar="CHECKPOINT", help="also score it with transformers")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    p.add_argument(
        "--window",
        "--stride",
        type=int,
        default=None,
        help="tokens per non-overlapping window (default: the engine's max_input_len)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_runtime_options(p)


def cmd_eval(args: argparse.Namespace) -> int:
    from kiln.eval_perplexity import EvalOptions, evaluate, summary

    options = EvalOptions(args.engine, args.text, args.compare_hf, args.max_tokens, args.window, not args.json)
    result = evaluate(options, **_runtime(args))
    print(result.to_json() if args.json else summary(result))
    return 0


def _add_chat(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat with an engine on the terminal, turn by turn (/reset, /exit)")
    p.add_argument("engine", help="engine directory written by `kiln build`")
    p.add_argument("--system", default=None, help="system message that opens the conversation")
    add_sampling_options(p, max_new_tokens=256)
    _add_runtime_options(p)


def cmd_chat(args: argparse.Namespace) -> int:
    from kiln.chat_cli import chat

    return chat(args.engine, sampling_from_args(args), system=args.system, runtime=_runtime(args))


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
        "--allow-image-urls", action="store_true", help="let clients send http(s) image URLs for the server to download"
    )
    p.add_argument(
        "--shutdown-timeout", type=int, default=10, help="seconds in-flight requests get to finish on SIGTERM"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument(
        "--log-interval",
        type=float,
        default=10.0,
        help="seconds between throughput / KV-usage log lines while there is work (0: none)",
    )
    _add_runtime_options(p)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kiln", description="Compile Hugging Face LLMs into inference engines and run them."
    )
    p.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_run(sub)
    _add_chat(sub)
    _add_serve(sub)
    _add_bench(sub)
    _add_eval(sub)
    return p


def cmd_build(args: argparse.Namespace) -> int:
    from kiln.api import build

    start = time.perf_counter()
    out = build(args.checkpoint, args.output, **{**values(args, BuildConfig), **resolve_aliases(args)})
    print(f"engine written to {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as exc:
        raise KilnError(f"--prompt-ids takes comma-separated integers, got {text!r}") from exc


def cmd_run(args: argparse.Namespace) -> int:
    from kiln import run_output, run_prompts

    if not args.prompt and not args.prompt_ids:
        if not args.image:
            raise KilnError("give at least one --prompt or --prompt-ids")
        args.prompt = [""]  # images alone (Nougat, Donut: no text prompt)
    if not all(args.prompt) and not args.image:
        raise KilnError("--prompt is empty: give some text (or token ids with --prompt-ids)")
    prompt_ids = [_parse_ids(t) for t in args.prompt_ids]
    if not all(prompt_ids):
        raise KilnError("--prompt-ids is empty: give at least one token id")
    params = sampling_from_args(args)
    media = bool(args.image or args.video)
    if args.num_frames is not None and not args.video:
        raise KilnError("--num-frames goes with --video")
    given = run_prompts.prepare(
        args.engine, args.prompt, prompt_ids, chat=args.chat, params=params, check_lengths=not media
    )
    from rich.console import Console

    from kiln.api import LLM

    err = Console(stderr=True)
    start = time.perf_counter()
    llm = LLM(args.engine, progress=not args.json, **_runtime(args))
    load_s = time.perf_counter() - start
    prompts = attach_media([p.prompt for p in given], args.image, args.video, args.num_frames, args.batch_size)

    stream = not args.json and len(prompts) == 1 and not media
    echoed = False

    def show(update: Any) -> None:
        nonlocal echoed  # the prompt is echoed once the engine has taken it
        if not echoed:
            print(given[0].shown, end="")
            echoed = True
        print(update.delta_text, end="", flush=True)

    gen_start = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, on_update=show if stream else None)
    except RequestError as exc:
        raise KilnError(run_prompts.as_flags(str(exc))) from exc
    gen_s = time.perf_counter() - gen_start
    generated = sum(len(o.token_ids) for o in outs)
    accuracy = None
    if args.check_accuracy:
        from kiln.accuracy import check_accuracy

        accuracy = check_accuracy(
            llm.engine.manifest,
            prompts,
            [o.prompt_token_ids for o in outs],
            [o.token_ids for o in outs],
            checkpoint=args.checkpoint,
        )
    if args.json:
        print(
            json.dumps(
                {
                    "engine": args.engine,
                    "load_s": round(load_s, 3),
                    "generate_s": round(gen_s, 3),
                    "tokens_per_s": round(generated / gen_s, 2) if gen_s > 0 else None,
                    "compiled": llm.engine.compiled,
                    "outputs": run_output.json_outputs(given, outs),
                    **({"profile": {k: round(v, 6) for k, v in llm.last_profile.items()}} if args.profile else {}),
                    **(
                        {
                            "accuracy": [
                                {"index": r.index, "match": r.match, "first_difference": r.first_difference}
                                for r in accuracy
                            ]
                        }
                        if accuracy is not None
                        else {}
                    ),
                },
                indent=2,
            )
        )
        return 0 if accuracy is None or all(r.match for r in accuracy) else 1
    if stream:
        print()
    else:
        print(run_output.texts(given, outs))
    ttft = min(o.metrics["time_to_first_token_s"] for o in outs)
    err.print(
        f"[dim]{len(outs)} prompt(s), {generated} tokens in {gen_s:.2f} s: {generated / gen_s:.1f} tokens/s; "
        f"first token after {ttft * 1000:.0f} ms; engine load {load_s:.1f} s "
        f"({'compiled' if llm.engine.compiled else 'eager'})[/dim]"
    )
    if args.profile:
        err.print(run_output.profile_table(llm.last_profile))
    if accuracy is not None:
        for r in accuracy:
            verdict = "match" if r.match else f"DIFFER from token {r.first_difference}"
            err.print(f"check-accuracy prompt {r.index}: {len(r.kiln_tokens)} greedy tokens vs transformers: {verdict}")
        if not all(r.match for r in accuracy):
            return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kiln.bench.run import BenchOptions, run

    try:
        batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    except ValueError as exc:
        raise KilnError(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}") from exc
    runtime = _runtime(args)
    options = BenchOptions(
        engine=args.engine,
        batch_sizes=batch_sizes,
        input_len=args.input_len,
        output_len=args.output_len,
        compare_hf=args.compare_hf,
        hf_systems=tuple(s.strip() for s in args.hf_systems.split(",") if s.strip()),
        throughput=args.throughput,
        num_requests=args.num_requests,
        output_dir=Path(args.output_dir),
        runtime=runtime,
    )
    run(options, args.argv)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kiln.serve.app import ServeSettings
    from kiln.serve.server import serve

    if not 0 <= args.port <= 65535:
        raise KilnError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1024:
        raise KilnError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.shutdown_timeout < 0:
        raise KilnError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.log_interval < 0:
        raise KilnError(f"--log-interval must be >= 0 (0: no throughput lines), got {args.log_interval}")
    name = args.served_model_name or Path(args.engine).resolve().name
    settings = ServeSettings(
        model_name=name,
        api_key=args.api_key or None,
        max_body_bytes=args.max_body_bytes,
        allow_image_urls=args.allow_image_urls,
    )
    return serve(
        args.engine,
        host=args.host,
        port=args.port,
        settings=settings,
        runtime=RuntimeConfig.from_dict(_runtime(args)),
        shutdown_timeout_s=args.shutdown_timeout,
        log_level=args.log_level,
        log_interval_s=args.log_interval,
    )


def _quiet_transformers() -> None:
    """transformers' own log lines and progress bars stay out of kiln's output (kiln reports its stages)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    args.argv = argv
    _quiet_transformers()
    try:
        commands = {
            "build": cmd_build,
            "run": cmd_run,
            "chat": cmd_chat,
            "serve": cmd_serve,
            "bench": cmd_bench,
            "eval": cmd_eval,
        }
        return commands[args.command](args)
    except KilnError as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
