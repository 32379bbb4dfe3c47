"""Tokens/sec and acceptance of spec-stream against baseline engines and peers.

    python dataset_tps.py --model_type spec_stream            # spec_stream vs naive, all datasets
    python dataset_tps.py --model_type all --dataset e2e_nlg --data-dir ../shared/datasets

Batch 1, greedy, the same prompts for every engine. Every argument, path and checkpoint
is checked before the first engine starts. Per engine: one warm-up prompt, then
`--repeats` timed passes over the prompts (the median tokens/s is reported with its
spread). `naive` always runs first: the fp32 reference for speedup. "identical" compares
each engine with greedy decoding of its own model in its own dtype; the comparison with
fp32 `naive` is a column of its own (see `spec_stream.benchmark`). Quality, SQL validity
(Spider) and repeated 4-grams are reported beside the speed. Prints a table and writes
every figure (and the machine) to a JSON file; `scripts/plot_results.py` plots it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from spec_stream import defaults
from spec_stream.arithmetic import measure_machine
from spec_stream.benchmark import (REPORT_SCHEMA_VERSION, BenchmarkSettings, benchmark_task,
                                   check_draft_model, check_tree_depth, default_checkpoint, machine_info,
                                   prepare_task, uses_streams)
from spec_stream.engines import ENGINE_NAMES, ENGINES, engines_for
from spec_stream.data import is_preset, resolve_dataset
from spec_stream.errors import UserError, exit_on_user_error
from spec_stream.timing import resolve_device


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--model_type", "--model-type", default="spec_stream",
        help=f"one of {', '.join(ENGINE_NAMES)}, a comma-separated list, or all (naive always runs)")
    add("--dataset", default="all", help=f"a preset ({', '.join(defaults.DATASETS)}), all, or your own data: a .jsonl, "
        ".json, .csv or .parquet file, a folder of them, or a hub dataset id (with --prompt-template and "
        "--response-field); quality is then ROUGE-L and BLEU against the response")
    add("--prompt-template", default=None, help="your own data: a row's prompt, str.format over its columns, e.g. "
        "'Question: {question}\\nAnswer:'")
    add("--response-field", default=None, help="your own data: the column holding the reference response")
    add("--response-template", default=None, help="your own data: the reference as a template instead")
    add("--model", default=None, help="fine-tuned checkpoint folder or hub id; default: one per dataset, "
        "prepared once under --checkpoint-dir")
    add("--checkpoint-dir", default=defaults.CHECKPOINT_DIR, help="where default checkpoints live")
    add("--data-dir", default=os.environ.get("SPEC_STREAM_DATA_DIR"),
        help="local JSON-lines copies laid out like shared/datasets (default: the hub)")
    add("--split", "--test-split", default=None, help="benchmark split (default: test; validation for spider; "
        "a single file of your own is split 80/10/10 into train, validation and test by a fixed-seed hold-out)")
    add("--num-samples", type=int, default=None, help=f"prompts per dataset (default {defaults.NUM_SAMPLES})")
    add("--max-new-tokens", type=int, default=None, help=f"default {defaults.MAX_NEW_TOKENS}")
    add("--repeats", type=int, default=defaults.REPEATS, help="timed passes over the prompts per engine")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add("--output", default=defaults.REPORT_PATH, help="JSON file for every figure")
    add("--half-dtype", choices=("fp16", "bf16"), default=defaults.HALF_DTYPE)
    add("--draft-model", default=None, help="small GPT-Neo draft model for the assisted engine")
    add("--tree-widths", default=",".join(map(str, defaults.DEFAULT_TREE_WIDTHS)),
        help="spec_stream tree: top-k per stream, one width per level")
    add("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
        help="run static/spec_stream steps eagerly on a GPU (default: one CUDA graph per step)")
    return parser


def resolve_engines(model_type: str, draft_model: str | None, device: torch.device) -> tuple[str, ...]:
    """The engines to run, `naive` first. `all` means every engine that runs on ``device``
    (`assisted` only with a draft model)."""
    requested = engines_for(device) if model_type == "all" else tuple(t.strip() for t in model_type.split(","))
    unknown = [t for t in requested if t not in ENGINE_NAMES]
    if unknown:
        raise UserError(f"unknown --model_type {', '.join(unknown)}; choose from {', '.join(ENGINE_NAMES)} or all")
    elsewhere = [t for t in requested if device.type not in ENGINES[t].devices]
    if elsewhere:
        raise UserError(f"--model_type {', '.join(elsewhere)} cannot run on {device.type}; drop it or pass "
                        f"--device {ENGINES[elsewhere[0]].devices[0]}")
    if "assisted" in requested and not draft_model:
        if model_type != "all":
            raise UserError("the assisted engine needs a small GPT-Neo draft model: pass --draft-model PATH_OR_ID")
        requested = tuple(t for t in requested if t != "assisted")
    return ("naive",) + tuple(t for t in dict.fromkeys(requested) if t != "naive")


def parse_tree_widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise UserError(f"--tree-widths {text!r}: give comma-separated integers like 4,3,2") from None
    if any(k < 1 for k in widths):
        raise UserError(f"--tree-widths {text}: every width must be at least 1 (top-k per stream), e.g. 4,3,2")
    return widths


def at_least(flag: str, value: int, minimum: int, what: str) -> int:
    if value < minimum:
        raise UserError(f"{flag} {value}: {what}; pass at least {minimum}")
    return value


def resolve_datasets(args: argparse.Namespace) -> tuple:
    """--dataset with the template flags: the presets' names, or one dataset of the user's."""
    templates = (args.prompt_template, args.response_field, args.response_template)
    if args.dataset == "all":
        if templates != (None, None, None):
            raise UserError("--prompt-template, --response-field and --response-template describe your own data; "
                            "pass it with --dataset FILE_OR_HUB_ID instead of all")
        return defaults.DATASETS
    if args.prompt_template is None and not is_preset(args.dataset) and not Path(args.dataset).exists():
        raise UserError(f"unknown --dataset {args.dataset!r}; choose from {', '.join(defaults.DATASETS)} or all, or "
                        "name your own data (a .jsonl, .json, .csv or .parquet file or a hub dataset id) with "
                        "--prompt-template and --response-field")
    return (resolve_dataset(args.dataset, *templates),)


def parse_settings(argv=None) -> BenchmarkSettings:
    """The command line as checked settings; every bad value is a UserError."""
    args = build_parser().parse_args(argv)
    datasets = resolve_datasets(args)
    device = resolve_device(args.device)
    sized = "cuda" if device.type == "cuda" else "cpu"
    num_samples = defaults.NUM_SAMPLES[sized] if args.num_samples is None else args.num_samples
    max_new_tokens = defaults.MAX_NEW_TOKENS[sized] if args.max_new_tokens is None else args.max_new_tokens
    return BenchmarkSettings(
        engines=resolve_engines(args.model_type, args.draft_model, device),
        datasets=datasets,
        device=device,
        num_samples=at_least("--num-samples", num_samples, 1, "measure at least 1 sample per dataset"),
        max_new_tokens=at_least("--max-new-tokens", max_new_tokens, 1, "generate at least 1 token"),
        repeats=at_least("--repeats", args.repeats, 1, "time every prompt at least once (3 give a spread)"),
        tree_widths=parse_tree_widths(args.tree_widths),
        half_dtype=torch.float16 if args.half_dtype == "fp16" else torch.bfloat16,
        output=Path(args.output), model=args.model, checkpoint_dir=Path(args.checkpoint_dir),
        data_dir=args.data_dir, split=args.split, draft_model=args.draft_model, cuda_graphs=args.cuda_graphs,
    )


def check_output(output: Path) -> None:
    """Fail now, not after the benchmark: ``output`` must be a file path in a writable place."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; name a JSON file, e.g. --output {output / 'dataset_tps.json'}")
    if output.exists() and not output.is_file():
        raise UserError(f"--output {output} is not a regular file; name a JSON file")
    existing = next(folder for folder in output.parents if folder.exists())
    if not existing.is_dir():
        raise UserError(f"--output {output} lies under the file {existing}; choose a path under a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"--output {output}: cannot write in {existing} ({error.strerror}); "
                        "choose a folder you can write to") from None


def write_report(report: dict, output: Path) -> None:
    """Write ``report`` to ``output`` in one rename; nothing is left behind on failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(report, indent=2))
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


def checkpoints_for(settings: BenchmarkSettings) -> dict[str, str]:
    """The checkpoint of each dataset: --model for all, else the default one (prepared
    once, after checking that the tree fits the streams it will have)."""
    if settings.model:
        return {task: settings.model for task in settings.datasets}
    if uses_streams(settings.engines):
        check_tree_depth(settings.tree_widths, defaults.NUM_SPEC_STREAMS, "the default checkpoint")
    return {task: str(default_checkpoint(task, settings.device, settings.checkpoint_dir, settings.data_dir))
            for task in settings.datasets}


def table_cells(r: dict) -> list[str]:
    spread = r["tokens_per_second_spread"]
    return [
        r["dataset"], r["engine"], r["backend"], f"{r['tokens_per_second']:.1f}",
        f"{spread['min']:.1f}-{spread['max']:.1f} ({spread['iqr']:.1f})",
        f"{1e3 / r['tokens_per_second']:.2f} / {r['predicted_ms_per_token']['ms']:.2f} "
        f"{r['predicted_ms_per_token']['bound'][:3]}", f"{r['speedup_vs_naive']:.2f}x",
        f"{r['tokens_per_call']:.2f}", "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
        f"{r['identical_to_greedy']:.0%}", f"{r['identical_to_naive']:.0%}", f"{r['bandwidth_share']:.1%}",
        ", ".join(f"{k} {v:.3g}" for k, v in r["quality"].items()), f"{r['repetition']:.0%}",
        f"{r['peak_memory_mb']:.0f}",
    ]


def print_table(rows: list[dict], console: Console, repeats: int) -> None:
    table = Table(title=f"dataset_tps: batch 1, greedy; tok/s = median of {repeats} timed passes, "
                        "spread = min-max (IQR)")
    columns = ("dataset", "engine", "backend", "tok/s", "spread", "ms/token / bound", "speedup", "tok/call", "accept", "identical",
               "= naive fp32", "BW share", "quality", "repeat 4-gram", "peak MB")
    for column in columns:
        table.add_column(column, justify="left" if column in ("dataset", "engine", "backend") else "right")
    for row in rows:
        table.add_row(*table_cells(row))
    console.print(table)


@exit_on_user_error
def main(argv=None) -> int:
    settings = parse_settings(argv)
    check_output(settings.output)
    checkpoints = checkpoints_for(settings)
    inputs = [prepare_task(task, checkpoints[task], settings) for task in settings.datasets]
    if "assisted" in settings.engines:
        check_draft_model(settings.draft_model)
    probe = measure_machine(settings.device)
    print(f"{settings.device}: copy {probe.copy_bytes_per_second / 1e9:.1f} GB/s (read + write), read "
          f"{probe.read_bytes_per_second / 1e9:.1f} GB/s, fp32 matmul {probe.matmul_flops_per_second / 1e9:.0f} GFLOP/s")
    rows = [row for task_inputs in inputs for row in benchmark_task(task_inputs, settings, probe)]
    console = Console()
    print_table(rows, console if console.is_terminal else Console(width=260), settings.repeats)  # logs: full table
    machine = {**machine_info(settings.device), "copy_gb_per_second": probe.copy_bytes_per_second / 1e9,
               "read_gb_per_second": probe.read_bytes_per_second / 1e9,
               "matmul_gflops_per_second": probe.matmul_flops_per_second / 1e9}
    write_report({"schema_version": REPORT_SCHEMA_VERSION, "machine": machine, "settings": settings.to_json(),
                  "results": rows}, settings.output)
    print(f"wrote {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
