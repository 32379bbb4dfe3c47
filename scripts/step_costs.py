"""What one decoding step costs, by tree and by way of running it, against upstream and the roofline.

    python scripts/step_costs.py                                # tiny, small and 125M shapes, random weights
    python scripts/step_costs.py --model checkpoints/e2e_nlg-small-streams --trees "(),(1,1,1),(4,3,2)"

For each model (a checkpoint folder or a built-in size from `spec_stream.checkpoints`): the
milliseconds per token of upstream `transformers` greedy decoding on the same weights, and
the milliseconds per step of our one step (`tree_step.TreeStep`) for each tree, on the one
runner `generate` uses (`FixedShapeDecoder`) in each mode named in ``--runners``: ``eager``
(a CPU's default) and ``compiled`` (``generate(..., compile_config=CompileConfig())``). Each cell is the median of ``--repeats``
measurements of ``--steps`` steps after a prompt of each ``--prompt`` length (a short and a
long context by default), with the min-max
spread, and its ratio to the same runner's one-token step ``()``. Beside each cell, the
roofline bound of that forward pass (`spec_stream.arithmetic`: FLOPs over the measured fp32
matmul rate, weight and cache bytes over the measured memory read rate; the larger binds).
Prints a table and writes JSON. Run it on an otherwise idle machine: anything running beside
it inflates every cell.
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from huggingface.transformers.generation.speculative_tree import TreeSpec, tree_size
from huggingface.transformers.generation.tree_search import probe_step_seconds
from spec_stream import GPTNeoForCausalLM
from spec_stream.arithmetic import (ModelShape, forward_bytes, forward_flops, load_config, measure_machine,
                                    roofline_seconds)
from spec_stream.benchmark.machine import machine_info
from spec_stream.checkpoints import check_result_file
from spec_stream.cli_help import PlainDefaultsHelpFormatter
from spec_stream.errors import UserError, exit_on_user_error, require_at_least_one

TREES = ((), (1,), (1, 1, 1), (2, 2), (2, 2, 2), (4, 3, 2), (8, 4, 2))
RUNNERS = ("eager", "compiled")  # `fixed_shape` modes of a CPU


def parse_trees(text: str) -> tuple:
    """``"(),(1,),(2,2)"`` -> ((), (1,), (2, 2))."""
    try:
        trees = ast.literal_eval(f"[{text}]")
        return tuple(TreeSpec(tuple(tree)).widths for tree in trees)
    except (ValueError, SyntaxError, TypeError):
        raise UserError(f"--trees {text!r}: give tuples of widths like \"(),(1,),(2,2),(4,3,2)\"") from None


def build_model(name: str, streams: int) -> GPTNeoForCausalLM:
    """A checkpoint as saved, or a built-in size with random weights and ``streams`` streams."""
    config = load_config(name)
    if not Path(name).is_dir():
        config.num_spec_streams = streams
        config.num_stream_layers = max(1, config.num_layers // 2)
    torch.manual_seed(0)
    model = GPTNeoForCausalLM.from_pretrained(name) if Path(name).is_dir() else GPTNeoForCausalLM(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def upstream_ms_per_token(model, prompt: torch.Tensor, tokens: int, repeats: int) -> list[float]:
    """Upstream greedy on our weights: (time for 1 + tokens new tokens - time for 1) / tokens."""
    upstream = transformers.GPTNeoForCausalLM(transformers.GPTNeoConfig(**model.config.to_dict())).eval()
    upstream.load_state_dict(model.state_dict(), strict=False)

    def seconds(new):
        start = time.perf_counter()
        upstream.generate(prompt, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        return time.perf_counter() - start

    seconds(2)  # warm-up
    return [1e3 * (seconds(1 + tokens) - seconds(1)) / tokens for _ in range(repeats)]


def roofline_ms(shape: ModelShape, widths: tuple, prompt: int, probe) -> float:
    """The bound of one tree step: its nodes through the model, the streams its depth drafts
    from at every node where they run."""
    nodes = tree_size(widths)
    streams = min(shape.streams, len(widths)) * nodes
    flops = forward_flops(shape, nodes, prompt, logits_rows=nodes, stream_rows=streams)
    return 1e3 * roofline_seconds(flops, forward_bytes(shape, torch.float32, nodes, prompt), probe)["seconds"]


def measure(name: str, prompt_length: int, trees, args, probe) -> dict:
    model = build_model(name, args.streams)
    trees = [t for t in trees if len(t) <= model.config.num_spec_streams]
    prompt_length = min(prompt_length, model.config.max_position_embeddings // 2)  # as the probe caps it
    prompt = torch.randint(1, model.config.vocab_size, (1, prompt_length), generator=torch.Generator().manual_seed(1))
    shape = ModelShape.of(model.config)
    row = {"model": f"{name} @{prompt_length}", "prompt": prompt_length,
           "upstream_naive": spread(upstream_ms_per_token(model, prompt, args.steps, args.repeats)),
           "upstream_roofline": roofline_ms(shape, (), prompt_length, probe),
           "roofline": {str(w): roofline_ms(shape, w, prompt_length, probe) for w in trees}, "runners": {}}
    for runner in args.runners:
        runs = [probe_step_seconds(model, prompt_length, args.steps, trees, mode=runner) for _ in range(args.repeats)]
        cells = {str(w): spread([1e3 * run[w] for run in runs]) for w in trees}
        for widths in trees:
            one_token = cells.get("()")
            cells[str(widths)]["ratio"] = cells[str(widths)]["median"] / one_token["median"] if one_token else None
        row["runners"][runner] = cells
    return row


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def print_table(rows: list[dict], trees) -> None:
    print(" | ".join(["model", "runner", "upstream"] + [str(t) for t in trees]))
    for row in rows:
        upstream = f"{row['upstream_naive']['median']:.2f} ({row['upstream_roofline']:.2f})"
        print(" | ".join([row["model"], "roofline", upstream] + [
            f"{row['roofline'][str(w)]:.2f}" if str(w) in row["roofline"] else "-" for w in trees]))
        for runner, cells in row["runners"].items():
            def cell(widths):
                c = cells.get(str(widths))
                if c is None:
                    return "-"
                ratio = f" x{c['ratio']:.2f}" if c["ratio"] is not None else ""
                return f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f}){ratio}"
            print(" | ".join([row["model"], runner, ""] + [cell(w) for w in trees]))
    print("ms per token (upstream) or per step (trees): median (min-max); x: that runner's step over its one-token "
          "step (); the roofline row: each step's bound (upstream's in brackets)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=PlainDefaultsHelpFormatter)
    parser.add_argument("--model", action="append", help="checkpoint folder or built-in size (repeatable) "
                        "(default: tiny, small and 125M)")
    parser.add_argument("--trees", default=",".join(str(t) for t in TREES), help="trees to time, as Python "
                        "tuples of widths separated by commas")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="ways to run the step: eager, compiled")
    parser.add_argument("--streams", type=int, default=3, help="streams of a built-in size")
    parser.add_argument("--prompt", default="64,400", help="prompt tokens before the timed steps: one length or "
                        "several, comma-separated (each capped at half the model's context)")
    parser.add_argument("--steps", type=int, default=16, help="steps per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell")
    parser.add_argument("--output", default="results/step_costs.json", help="JSON file for every figure")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    require_at_least_one(args, ("streams", "steps", "repeats"))
    try:
        args.prompt = tuple(int(n) for n in args.prompt.split(","))
    except ValueError:
        raise UserError(f"--prompt {args.prompt!r}: give prompt lengths like 64 or 64,400") from None
    if not args.prompt or min(args.prompt) < 1:
        raise UserError(f"--prompt {args.prompt}: every prompt length must be at least 1")
    args.trees = parse_trees(args.trees)
    args.runners = tuple(args.runners.split(","))
    if not args.runners or set(args.runners) - set(RUNNERS):
        raise UserError(f"--runners {','.join(args.runners)}: choose from {', '.join(RUNNERS)}")
    check_result_file(Path(args.output), "--output", args.overwrite, "step_costs.json")
    args.model = args.model or ["tiny", "small", "125M"]
    for name in args.model:
        load_config(name)  # every model checked before any timing
    return args


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    probe = measure_machine("cpu")
    machine = machine_info(torch.device("cpu"))
    print(f"{machine['cpu']} (L3 {machine['l3_cache']}): matmul {probe.matmul_flops_per_second / 1e9:.0f} GFLOP/s, "
          f"memory read {probe.read_bytes_per_second / 1e9:.1f} GB/s, {probe.threads} threads")
    rows = [measure(name, length, args.trees, args, probe) for name in args.model for length in args.prompt]
    print_table(rows, args.trees)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"machine": machine_info(torch.device("cpu")), "probe": vars(probe),
                                  "settings": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
