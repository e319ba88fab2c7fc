"""kiln against transformers on the CPU: decode ms/token, side by side in one run.

    python benchmarks/cpu_speed.py [--workdir /tmp/kiln-cpu-speed] [--models demo,llama-3.2-1b]
        [--dtypes float32,bfloat16] [--batch-sizes 1,8,32] [--repeats 3] [--quick] [--threads N]
        [--systems kiln,...] [--json OUT]

For each model and dtype (one subprocess each, so each one's memory is freed before the next):
kiln (the engine built for that dtype, `kiln build --device cpu`, kept in --workdir), transformers
eager `generate` (dynamic cache), and transformers with a static cache and `torch.compile` (asked
for explicitly: transformers compiles only on accelerators by itself). For every batch size the
three are timed in turn, --repeats times, so that load from other processes falls on all of them;
each cell is the median. Greedy, EOS ignored, 64 prompt tokens, 64 new tokens (synthetic ids).
ms/token = (total time - time to the first token) / 63: one decode step. The ratio is kiln over
the better transformers system (< 1: kiln is faster).

Models: `demo` (demo/tiny-kiln) and `llama-3.2-1b` (the real architecture's config with random
weights, written to --workdir once, in bfloat16). --quick: one timed run per cell instead of
--repeats. --threads: torch threads for every system (on a machine shared with other work, 1 keeps
a parked thread from stalling each parallel region). Needs about 12 GB of memory for the 1B float32
cell (the engine's weights and transformers' copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
INPUT_LEN = 64
OUTPUT_LEN = 64
SYSTEMS = ("kiln", "transformers eager", "transformers static+compile")


def make_checkpoint(name: str, path: Path) -> Path:
    """The checkpoint of `name`: the demo's directory, or a random-weight one written once to `path`."""
    if name == "demo":
        return ROOT / "demo" / "tiny-kiln"
    if (path / "config.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load_time import CONFIGS
    from tiny_checkpoints import make_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIGS[name])).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def build_engine(checkpoint: Path, engine: Path, dtype: str, max_batch: int) -> None:
    """`kiln build` for the CPU, unless an engine for these settings is there already."""
    manifest = engine / "manifest.json"
    if manifest.is_file():
        build = json.loads(manifest.read_text())["build"]
        if build["dtype"] == dtype and build["max_batch_size"] >= max_batch:
            return
    command = [sys.executable, "-m", "kiln", "build", str(checkpoint), "-o", str(engine), "--dtype", dtype]
    command += ["--device", "cpu", "--max-batch-size", str(max_batch), "--max-seq-len", "256"]
    command += ["--max-input-len", "128", "--max-num-tokens", str(max(512, max_batch * INPUT_LEN))]
    subprocess.run(command, check=True, cwd=ROOT)


def prompts(batch: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 1, (batch, INPUT_LEN), generator=g).tolist()


class Kiln:
    def __init__(self, engine: Path) -> None:
        from kiln import LLM, SamplingParams

        self.llm = LLM(engine)
        self.params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True, detokenize=False)
        self.vocab = self.llm.engine.manifest.model.vocab_size

    def ms_per_token(self, batch: int, seed: int) -> float:
        engine = self.llm.engine
        requests = [engine.validate(ids, self.params) for ids in prompts(batch, self.vocab, seed)]
        seqs = [engine.add_request(r) for r in requests]
        first = None
        while any(not s.is_finished for s in seqs):
            engine.step()
            if first is None and all(s.output_ids for s in seqs):
                first = time.perf_counter()
        assert first is not None and all(len(s.output_ids) == OUTPUT_LEN for s in seqs)
        return (time.perf_counter() - first) / (OUTPUT_LEN - 1) * 1000


class FirstToken:
    """A streamer for generate: notes when the first new tokens reach it (the prompt comes first)."""

    def __init__(self) -> None:
        self.puts = 0
        self.at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


class Transformers:
    def __init__(self, checkpoint: Path, dtype: str, static: bool) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model: Any = AutoModelForCausalLM.from_pretrained(
            checkpoint, dtype=getattr(torch, dtype), local_files_only=True
        ).eval()
        self.static = static
        self.vocab = int(self.model.config.vocab_size)

    def generate(self, ids: Any, streamer: Any = None) -> Any:
        import torch
        from transformers import CompileConfig

        kwargs: dict[str, Any] = {"max_new_tokens": OUTPUT_LEN, "min_new_tokens": OUTPUT_LEN, "do_sample": False}
        if self.static:
            compile_config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
            compile_config._compile_all_devices = True  # transformers compiles only on accelerators by default
            kwargs.update(cache_implementation="static", compile_config=compile_config)
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), pad_token_id=0, streamer=streamer, **kwargs
            )
        assert out.shape[1] == ids.shape[1] + OUTPUT_LEN
        return out

    def ms_per_token(self, batch: int, seed: int) -> float:
        import torch

        ids = torch.tensor(prompts(batch, self.vocab, seed))
        clock = FirstToken()
        self.generate(ids, clock)
        end = time.perf_counter()
        assert clock.at is not None
        if self.static:
            assert hasattr(self.model, "_compiled_call"), "generate did not compile the model"
        return (end - clock.at) / (OUTPUT_LEN - 1) * 1000


def run_cell(args: argparse.Namespace) -> None:
    """One model and dtype, in this process: every system at every batch size, alternately."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoint = make_checkpoint(args.model, args.workdir / f"{args.model}-ckpt")
    engine = args.workdir / f"{args.model}-{args.dtype}-engine"
    build_engine(checkpoint, engine, args.dtype, max(args.batch_sizes))
    wanted = args.systems.split(",")
    systems: dict[str, Any] = {"kiln": Kiln(engine)} if "kiln" in wanted else {}
    eager = Transformers(checkpoint, args.dtype, static=False)
    static = Transformers.__new__(Transformers)  # the same weights, another cache and compile
    static.model, static.static, static.vocab = eager.model, True, eager.vocab
    for name, system in (("transformers eager", eager), ("transformers static+compile", static)):
        if name in wanted:
            systems[name] = system
    rows = []
    for batch in args.batch_sizes:
        for system in systems.values():  # warm-up: paths, allocations, each compiled shape
            system.ms_per_token(batch, seed=1000)
        times: dict[str, list[float]] = {name: [] for name in systems}
        for repeat in range(args.repeats):
            for name, system in systems.items():
                times[name].append(system.ms_per_token(batch, seed=repeat))
        medians = {name: statistics.median(values) for name, values in times.items()}
        baselines = [name for name in medians if name != "kiln"]
        best = min(baselines, key=lambda n: medians[n]) if baselines else None
        rows.append(
            {
                "model": args.model,
                "dtype": args.dtype,
                "batch": batch,
                "ms_per_token": medians,
                "runs_ms": times,
                "best_transformers": best,
                "ratio": medians["kiln"] / medians[best] if best and "kiln" in medians else None,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"rows": rows, "threads": torch.get_num_threads()}))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def table(rows: list[dict[str, Any]]) -> str:
    head = "| model | dtype | batch | kiln | transformers eager | transformers static+compile | kiln / best |"
    lines = [head, "|" + " --- |" * 7]
    for r in rows:
        ms = r["ms_per_token"]
        cells = [f"{ms[s]:.2f}" if s in ms else "-" for s in SYSTEMS]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['dtype']} | {r['batch']} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-cpu-speed"))
    ap.add_argument("--models", default="demo,llama-3.2-1b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one timed run per cell")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every system (default: torch's)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="a subset of: " + ", ".join(SYSTEMS))
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default: WORKDIR/cpu_speed.json)")
    ap.add_argument("--model", help=argparse.SUPPRESS)  # one cell, in a subprocess
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model:
        run_cell(args)
        return
    rows: list[dict[str, Any]] = []
    threads = None
    for model in args.models.split(","):
        batches = args.batch_sizes
        for dtype in args.dtypes.split(","):
            command = [sys.executable, __file__, "--workdir", str(args.workdir), "--model", model, "--dtype", dtype]
            command += ["--threads", str(args.threads), "--systems", args.systems]
            command += [
                "--batch-sizes",
                ",".join(map(str, batches)),
                "--repeats",
                str(1 if args.quick else args.repeats),
            ]
            done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows += result["rows"]
            threads = result["threads"]
    out = {
        "command": " ".join(["python", "benchmarks/cpu_speed.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch threads",
        "input_len": INPUT_LEN,
        "output_len": OUTPUT_LEN,
        "rows": rows,
    }
    path = args.json or args.workdir / "cpu_speed.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"{out['command']}\n{out['date']}, {out['device']}; decode ms/token, {INPUT_LEN} in / {OUTPUT_LEN} out\n")
    print(table(rows))
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
