"""The bench results as a table (rich), JSON, and a PNG chart (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASELINE_ORDER = ("transformers static+compile", "transformers static", "transformers eager")


def latency_rows(results: list[dict[str, Any]], copy_bytes_per_s: float) -> list[dict[str, Any]]:
    """Each latency result with its achieved bandwidth, roofline fraction and ratio to transformers.

    The ratio is of tokens/s (counted), so a batch whose sequences began over several steps is not
    credited for the lighter steps at its end.
    """
    rows = []
    for r in results:
        baseline = next(
            (
                b
                for name in BASELINE_ORDER
                for b in results
                if b["system"] == name and b["batch"] == r["batch"] and r["system"] != name
            ),
            None,
        )
        gbps = r["step_bytes"] / (r["ms_per_token"] / 1000) / 1e9
        weights = r.get("weight_bytes")
        rows.append(
            {
                **r,
                # the weights a decode step reads (packed ones as stored), shared by the batch's tokens
                "weight_bytes_per_token": None if weights is None else weights / r["batch"],
                "achieved_gb_s": gbps,
                "roofline_fraction": gbps * 1e9 / copy_bytes_per_s,
                "vs_transformers": r["tokens_per_s"] / baseline["tokens_per_s"] if baseline else None,
                "vs_system": baseline["system"] if baseline else None,
            }
        )
    return rows


def baselines(rows: list[dict[str, Any]]) -> list[str]:
    """The systems the rows' ratios are taken against, in order of first use."""
    return list(dict.fromkeys(r["vs_system"] for r in rows if r.get("vs_system")))


def ratio_column(rows: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The ratio column's title and cells: one baseline is named in the title, several in each cell."""
    names = baselines(rows)
    if len(names) <= 1:
        title = f"vs {names[0]}" if names else "vs transformers"
        return title, [f"{r['vs_transformers']:.2f}x" if r.get("vs_system") else "-" for r in rows]
    family = "transformers "
    title, cut = ("vs transformers", len(family)) if all(n.startswith(family) for n in names) else ("vs baseline", 0)
    return title, [f"{r['vs_transformers']:.2f}x {r['vs_system'][cut:]}" if r.get("vs_system") else "-" for r in rows]


def print_tables(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if Console().is_terminal else 140)
    if report.get("latency"):
        table = Table(title=f"decode latency on {report['device']} (copy bandwidth {report['copy_gb_s']:.0f} GB/s)")
        ratio_title, ratios = ratio_column(report["latency"])
        columns = ("system", "batch", "TTFT ms", "ms/token", "tok/s", "weight MB/token", "GB/s", "of copy BW")
        for col in (*columns, ratio_title):
            table.add_column(col, justify="left" if col == "system" else "right")
        for r, ratio in zip(report["latency"], ratios):
            per_token = r.get("weight_bytes_per_token")
            table.add_row(
                r["system"],
                str(r["batch"]),
                f"{r['ttft_ms']:.1f}",
                f"{r['ms_per_token']:.3f}",
                f"{r['tokens_per_s']:.0f}",
                "-" if per_token is None else f"{per_token / 1e6:.2f}",
                f"{r['achieved_gb_s']:.0f}",
                f"{r['roofline_fraction']:.0%}",
                ratio,
            )
        console.print(table)
    if report.get("throughput"):
        table = Table(title="throughput (all requests submitted at once)")
        columns = ("system", "requests", "input", "output", "seconds", "output tok/s", "total tok/s", "mean TTFT s")
        for col in (*columns, "preempted", "KV tokens"):
            table.add_column(col, justify="left" if col == "system" else "right")
        for r in report["throughput"]:
            table.add_row(
                r["system"],
                str(r["num_requests"]),
                str(r["input_len"]),
                str(r["output_len"]),
                f"{r['total_s']:.1f}",
                f"{r['output_tokens_per_s']:.0f}",
                f"{r['total_tokens_per_s']:.0f}",
                f"{r['mean_ttft_s']:.2f}",
                str(r.get("preemptions", "")),
                _kv_tokens(r),
            )
        console.print(table)
        for r in report["throughput"]:
            if r.get("steps"):
                console.print(steps_table(r["steps"], f"{r['system']}: where the throughput run's time went"))


def _kv_tokens(row: dict[str, Any]) -> str:
    """The pool's tokens, with its storage dtype when it is a narrow (fp8 / int8) one."""
    tokens, dtype = str(row.get("kv_cache_tokens", "")), row.get("kv_cache_dtype", "auto")
    return tokens if dtype == "auto" else f"{tokens} ({dtype})"


def steps_table(steps: dict[str, Any], title: str) -> Any:
    """One row per kind of engine step (`StepTimer.summary()`): count, wall time, batch, device time."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("step kind", "steps", "wall s", "ms/step", "rows/step", "tokens/step", "device ms/step"):
        table.add_column(col, justify="left" if col == "step kind" else "right")
    for kind, row in steps.items():
        device = row.get("device_ms_per_timed_step")
        table.add_row(
            kind,
            str(row["steps"]),
            f"{row['wall_s']:.1f}",
            f"{row['ms_per_step']:.2f}",
            f"{row['rows_per_step']:.1f}",
            f"{row['tokens_per_step']:.1f}",
            "" if device is None else f"{device:.2f}",
        )
    return table


def write_json(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))


def write_chart(report: dict[str, Any], path: Path) -> bool:
    """Grouped bars of tokens/s and ms/token per system and batch size; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report.get("latency") or []
    if not rows:
        return False
    systems = list(dict.fromkeys(r["system"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        by_batch = {r["batch"]: r for r in rows if r["system"] == system}
        xs = [b + (i - (len(systems) - 1) / 2) * width for b in range(len(batches))]
        for ax, key in zip(axes, ("tokens_per_s", "ms_per_token")):
            ax.bar(xs, [by_batch[b][key] if b in by_batch else 0 for b in batches], width, label=system)
    for ax, title in zip(axes, ("output tokens/s (higher is better)", "ms per decode step (lower is better)")):
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    first = rows[0]
    fig.suptitle(
        f"{report['engine_name']} on {report['device']}: {first['input_len']}-token prompts, "
        f"{first['output_len']} new tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":  # re-draw a chart from a saved report: python -m kiln.bench.report report.json out.png
    import sys

    if not write_chart(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])):
        raise SystemExit("matplotlib is not installed, or the report has no latency results")
