"""Tokens/sec and acceptance of spec-stream against baseline engines and peers.

    python dataset_tps.py --model_type spec_stream            # spec_stream vs naive, all datasets
    python dataset_tps.py --model_type all --dataset e2e_nlg --data-dir ../shared/datasets

Batch 1, greedy, the same prompts for every engine, warm-up excluded, the device
synchronised around each timed call. `naive` always runs first: it is the reference for
speedup and for "identical outputs". Prints a table and writes every figure (and the
machine) to a JSON file; `scripts/plot_results.py` turns that into plots.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from spec_stream.errors import UserError, exit_on_user_error

DATASETS = ("spider", "dialogsum", "e2e_nlg")


def parse_args(argv=None) -> argparse.Namespace:
    from spec_stream.engines import ENGINE_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_type", "--model-type", default="spec_stream",
                        help=f"one of {', '.join(ENGINE_NAMES)}, a comma-separated list, or all (naive always runs)")
    parser.add_argument("--dataset", default="all", help=f"one of {', '.join(DATASETS)}, or all")
    parser.add_argument("--model", default=None,
                        help="fine-tuned checkpoint; default: one per dataset, prepared once under --checkpoint-dir")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where default checkpoints live")
    parser.add_argument("--data-dir", default=os.environ.get("SPEC_STREAM_DATA_DIR"),
                        help="local JSON-lines copies laid out like shared/datasets (default: the hub)")
    parser.add_argument("--split", default=None, help="benchmark split (default: test; validation for spider)")
    parser.add_argument("--num-samples", type=int, default=None, help="prompts per dataset (default 20 CPU, 30 GPU)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 64 CPU, 128 GPU")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--output", default="results/dataset_tps.json", help="JSON file for every figure")
    parser.add_argument("--half-dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--draft-model", default=None, help="small GPT-Neo draft model for the assisted engine")
    parser.add_argument("--tree-widths", default="4,3,2", help="spec_stream tree, top-k per stream")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run static/spec_stream steps eagerly on a GPU (default: one CUDA graph per step)")
    args = parser.parse_args(argv)
    return validate(args)


def validate(args: argparse.Namespace) -> argparse.Namespace:
    from spec_stream.engines import ENGINE_NAMES

    requested = ENGINE_NAMES if args.model_type == "all" else tuple(t.strip() for t in args.model_type.split(","))
    unknown = [t for t in requested if t not in ENGINE_NAMES]
    if unknown:
        raise UserError(f"unknown --model_type {', '.join(unknown)}; choose from {', '.join(ENGINE_NAMES)} or all")
    if args.model_type == "all" and not args.draft_model:
        requested = tuple(t for t in requested if t != "assisted")  # needs a draft model
    args.engines = ["naive"] + [t for t in requested if t != "naive"]
    if args.dataset != "all" and args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose from {', '.join(DATASETS)} or all")
    args.datasets = list(DATASETS) if args.dataset == "all" else [args.dataset]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        raise UserError(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N") from None
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    gpu = args.device.type == "cuda"
    args.num_samples = args.num_samples if args.num_samples is not None else (30 if gpu else 20)
    args.max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else (128 if gpu else 64)
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: measure at least 1 sample per dataset")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: generate at least 1 token")
    try:
        args.tree_widths = tuple(int(k) for k in args.tree_widths.split(",") if k.strip())
    except ValueError:
        raise UserError(f"--tree-widths {args.tree_widths!r}: give comma-separated integers like 4,3,2") from None
    args.half_dtype = torch.float16 if args.half_dtype == "fp16" else torch.bfloat16
    if args.model and not Path(args.model).exists() and "/" not in args.model:
        raise UserError(f"--model {args.model}: no such checkpoint folder; fine-tune one with "
                        "python -m spec_stream.finetune --dataset NAME --output DIR")
    return args


def print_table(rows: list[dict], console: Console) -> None:
    table = Table(title="dataset_tps: batch 1, greedy")
    for column in ("dataset", "engine", "backend", "tok/s", "speedup", "tok/call", "accept", "identical",
                   "BW share", "quality", "peak MB"):
        table.add_column(column, justify="left" if column in ("dataset", "engine", "backend") else "right")
    for r in rows:
        quality = ", ".join(f"{k} {v:.3g}" for k, v in r["quality"].items())
        accept = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        table.add_row(r["dataset"], r["engine"], r["backend"], f"{r['tokens_per_second']:.1f}",
                      f"{r['speedup_vs_naive']:.2f}x", f"{r['tokens_per_call']:.2f}", accept,
                      f"{r['identical_to_naive']:.0%}", f"{r['bandwidth_share']:.1%}", quality,
                      f"{r['peak_memory_mb']:.0f}")
    console.print(table)


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    from spec_stream.benchmark import benchmark_task, default_checkpoint, machine_info, measure_copy_rate
    from spec_stream.checkpoints import load_for_inference

    args.copy_rate = measure_copy_rate(args.device)
    print(f"{args.device}: device copy rate {args.copy_rate / 1e9:.1f} GB/s (the bandwidth yardstick)")
    rows = []
    for task in args.datasets:
        checkpoint = Path(args.model) if args.model else default_checkpoint(
            task, args.device, Path(args.checkpoint_dir), args.data_dir)
        if "spec_stream" in args.engines:
            load_for_inference(str(checkpoint), require_streams=True)  # clear error before any timing
        rows += benchmark_task(task, args.engines, checkpoint, args, args.device)
    console = Console()
    print_table(rows, console if console.is_terminal else Console(width=180))  # logs get the full table
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v) for k, v in vars(args).items()}
    machine = {**machine_info(args.device), "copy_gb_per_second": args.copy_rate / 1e9}
    report = {"machine": machine, "settings": settings, "results": rows}
    temporary = output.with_suffix(output.suffix + ".tmp")
    temporary.write_text(json.dumps(report, indent=2))
    os.replace(temporary, output)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
