"""Plots of a `dataset_tps.py` JSON report, written into images/.

    python scripts/plot_results.py results/dataset_tps.json --out images

1. tokens_per_second.png: tokens/s per engine and dataset (grouped bars);
2. speedup_vs_tokens_per_call.png: speedup over naive against tokens per forward call;
3. step_breakdown.png: spec_stream's time per step split into draft / forward / verify
   (one replayed graph per step when CUDA graphs ran).
Each title names the machine the figures come from.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def machine_label(report: dict) -> str:
    machine = report["machine"]
    return machine.get("gpu") or f"{machine.get('cpu', 'CPU')} ({machine.get('cpu_threads', '?')} threads)"


def finish(figure, axes, title, path):
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_tokens_per_second(rows, label, path):
    datasets = sorted({r["dataset"] for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    width = 0.8 / len(engines)
    figure, axes = plt.subplots(figsize=(max(6, 2 * len(datasets) + 2), 4))
    for i, engine in enumerate(engines):
        values = [next((r["tokens_per_second"] for r in rows if r["engine"] == engine and r["dataset"] == d), 0)
                  for d in datasets]
        axes.bar([x + i * width for x in range(len(datasets))], values, width, label=engine)
    axes.set_xticks([x + width * (len(engines) - 1) / 2 for x in range(len(datasets))], datasets)
    axes.set_ylabel("tokens / s (batch 1, greedy)")
    finish(figure, axes, f"Decoding speed on {label}", path)


def plot_speedup(rows, label, path):
    figure, axes = plt.subplots(figsize=(6, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        points = [r for r in rows if r["engine"] == engine]
        axes.scatter([r["tokens_per_call"] for r in points], [r["speedup_vs_naive"] for r in points], label=engine)
        for r in points:
            axes.annotate(r["dataset"], (r["tokens_per_call"], r["speedup_vs_naive"]), fontsize=7)
    axes.axhline(1.0, color="grey", linewidth=0.5)
    axes.set_xlabel("tokens per forward call")
    axes.set_ylabel("speedup over naive (tokens/s ratio)")
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
        values = [1000 * r["step_seconds"].get(section, 0.0) / max(r["forward_calls"] - r["samples"], 1) for r in rows]
        axes.bar([r["dataset"] for r in rows], values, bottom=bottoms, label=section)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    axes.set_ylabel("ms per tree step")
    finish(figure, axes, f"spec_stream step time on {label}", path)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="JSON written by dataset_tps.py")
    parser.add_argument("--out", default="images", help="folder for the PNG files")
    args = parser.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        rows = report["results"]
    except (OSError, ValueError, KeyError) as error:
        print(f"error: cannot read a dataset_tps report from {args.report} ({error}); run dataset_tps.py first",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = machine_label(report)
    plot_tokens_per_second(rows, label, out / "tokens_per_second.png")
    plot_speedup(rows, label, out / "speedup_vs_tokens_per_call.png")
    written = ["tokens_per_second.png", "speedup_vs_tokens_per_call.png"]
    if plot_step_breakdown(rows, label, out / "step_breakdown.png"):
        written.append("step_breakdown.png")
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
