"""Plots of a `dataset_tps.py` JSON report, written into images/.

    python scripts/plot_results.py results/dataset_tps.json --out images

1. tokens_per_second.png: median tokens/s per engine and dataset (grouped bars), the
   whiskers spanning the fastest and slowest timed pass;
2. speedup_vs_tokens_per_call.png: speedup over naive (median over median) against
   tokens per forward call, the whiskers the engine's min-max over naive's median;
3. step_breakdown.png: spec_stream's time per step split into draft / forward / verify
   (one replayed graph per step when CUDA graphs ran);
4. kv_cache.png: ms per forward call as the sequence grows, with and without the KV cache;
5. throughput_vs_batch.png (a `--batch-size 1,2,4,8` sweep): tokens/s against batch size
   for naive, static and spec_stream, one line per engine and dataset.
Plots 1-4 show the rows at the report's smallest batch size. Each title names the machine
the figures come from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spec_stream.cli_help import PlainDefaultsHelpFormatter  # noqa: E402


def machine_label(report: dict) -> str:
    machine = report["machine"]
    return machine.get("gpu") or f"{machine.get('cpu', 'CPU')} ({machine.get('cpu_threads', '?')} threads)"


def finish(figure, axes, title, path):
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def whiskers(rows, scale=lambda row: 1.0):
    """Asymmetric error bars from each row's min-max tokens/s around its median."""
    below = [(r["tokens_per_second"] - r["tokens_per_second_spread"]["min"]) * scale(r) for r in rows]
    above = [(r["tokens_per_second_spread"]["max"] - r["tokens_per_second"]) * scale(r) for r in rows]
    return [below, above]


def plot_tokens_per_second(rows, label, path, repeats):
    datasets = sorted({r["dataset"] for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    width = 0.8 / len(engines)
    figure, axes = plt.subplots(figsize=(max(6, 2 * len(datasets) + 2), 4))
    for i, engine in enumerate(engines):
        measured = [r for r in rows if r["engine"] == engine]
        positions = [datasets.index(r["dataset"]) + i * width for r in measured]
        axes.bar(positions, [r["tokens_per_second"] for r in measured], width, label=engine,
                 yerr=whiskers(measured), capsize=2, error_kw={"linewidth": 0.8})
    axes.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(datasets))], datasets)
    axes.set_ylabel(f"tokens / s, median of {repeats} passes (min-max)")
    finish(figure, axes, f"Decoding speed on {label}", path)


def plot_speedup(rows, label, path):
    naive = {r["dataset"]: r["tokens_per_second"] for r in rows if r["engine"] == "naive"}
    figure, axes = plt.subplots(figsize=(6, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        points = [r for r in rows if r["engine"] == engine]
        axes.errorbar([r["tokens_per_call"] for r in points], [r["speedup_vs_naive"] for r in points],
                      yerr=whiskers(points, lambda r: 1 / naive[r["dataset"]]), fmt="o", capsize=2, label=engine)
        for r in points:
            axes.annotate(r["dataset"], (r["tokens_per_call"], r["speedup_vs_naive"]), fontsize=7)
    axes.axhline(1.0, color="grey", linewidth=0.5)
    axes.set_xlabel("tokens per forward call")
    axes.set_ylabel("speedup over naive (median tokens/s ratio)")
    finish(figure, axes, f"Speedup against acceptance on {label}", path)


def plot_step_breakdown(rows, label, path):
    rows = [r for r in rows if r["engine"] == "spec_stream" and r.get("step_seconds")]
    if not rows:
        return False
    # eager steps: draft / forward / verify; CUDA-graph steps: one "step" (replayed graph)
    sections = [s for s in dict.fromkeys(k for r in rows for k in r["step_seconds"]) if s != "prefill"]
    figure, axes = plt.subplots(figsize=(6, 4))
    bottoms = [0.0] * len(rows)
    for section in sections:
        # milliseconds per tree step: forward calls minus the prefill of each sample
        values = [1000 * r["step_seconds"].get(section, 0.0) / max(r["forward_calls"] - r["samples"], 1)
                  for r in rows]
        axes.bar([r["dataset"] for r in rows], values, bottom=bottoms, label=section)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    axes.set_ylabel("ms per tree step")
    finish(figure, axes, f"spec_stream step time on {label}", path)
    return True


def plot_kv_cache(rows, label, path):
    """Milliseconds per forward call against the number of tokens generated so far, with
    (`naive`) and without (`no_cache`) the KV cache, one line per dataset; False when the
    report has no `no_cache` row."""
    pairs = [(r, next((n for n in rows if n["engine"] == "naive" and n["dataset"] == r["dataset"]), None))
             for r in rows if r["engine"] == "no_cache"]
    if not pairs:
        return False
    figure, axes = plt.subplots(figsize=(7, 4))
    for no_cache, naive in pairs:
        for row, style in ((naive, "-"), (no_cache, "--")):
            if row and row.get("call_seconds_by_step"):
                seconds = row["call_seconds_by_step"][1:]  # call 0 is the prefill
                axes.plot(range(1, len(seconds) + 1), [1e3 * s for s in seconds], style,
                          label=f"{row['dataset']}: {row['engine']}")
    axes.set_xlabel("tokens generated so far")
    axes.set_ylabel("ms per forward call (median over prompts)")
    finish(figure, axes, f"What the KV cache buys on {label}", path)
    return True


SWEPT_ENGINES = ("naive", "static", "spec_stream")  # plain, our loop without drafts, our loop with them


def plot_throughput_vs_batch(rows, label, path):
    """Median tokens/s (min-max whiskers) against batch size, log-2 axis; False unless the
    report holds more than one batch size."""
    sizes = sorted({r.get("batch_size", 1) for r in rows})
    if len(sizes) < 2:
        return False
    figure, axes = plt.subplots(figsize=(7, 4))
    for engine in SWEPT_ENGINES:
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            points = sorted((r for r in rows if r["engine"] == engine and r["dataset"] == dataset),
                            key=lambda r: r["batch_size"])
            if points:
                axes.errorbar([r["batch_size"] for r in points], [r["tokens_per_second"] for r in points],
                              yerr=whiskers(points), fmt="o-", capsize=2, label=f"{dataset}: {engine}")
    axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(size) for size in sizes])
    axes.set_xlabel("batch size (prompts decoded together)")
    axes.set_ylabel("tokens / s over all rows (median of passes)")
    finish(figure, axes, f"Throughput against batch size on {label}", path)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=PlainDefaultsHelpFormatter)
    parser.add_argument("report", help="JSON written by dataset_tps.py")
    parser.add_argument("--out", default="images", help="folder for the PNG files")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        rows, repeats = report["results"], report["settings"]["repeats"]
        if not all("tokens_per_second_spread" in row for row in rows):  # a report from before repeated timing
            raise KeyError("tokens_per_second_spread")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"error: cannot read a dataset_tps report with repeated timings from {args.report} "
              f"({type(error).__name__}: {error}); run dataset_tps.py (again) first", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.report} holds no results (every engine was skipped); run dataset_tps.py with engines "
              "that run here", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as error:
        print(f"error: --out {args.out}: cannot make that folder ({getattr(error, 'strerror', None) or error}); pass "
              "a folder path you can write to", file=sys.stderr)
        return 2
    label = machine_label(report)
    smallest = min(r.get("batch_size", 1) for r in rows)  # reports before batch sizes: batch 1
    first = [r for r in rows if r.get("batch_size", 1) == smallest]
    plot_tokens_per_second(first, label, out / "tokens_per_second.png", repeats)
    plot_speedup(first, label, out / "speedup_vs_tokens_per_call.png")
    written = ["tokens_per_second.png", "speedup_vs_tokens_per_call.png"]
    if plot_step_breakdown(first, label, out / "step_breakdown.png"):
        written.append("step_breakdown.png")
    if plot_kv_cache(first, label, out / "kv_cache.png"):
        written.append("kv_cache.png")
    if plot_throughput_vs_batch(rows, label, out / "throughput_vs_batch.png"):
        written.append("throughput_vs_batch.png")
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
