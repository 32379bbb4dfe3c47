"""What a user's ``model.generate()`` gets, beside the benchmark's `spec_stream` row, in one run.

    python scripts/generate_vs_benchmark.py --model checkpoints/e2e_nlg-small-streams --data-dir DIR

On the same prompts (``--num-samples`` of ``--dataset``'s test split, ``--max-new-tokens``
each), timed in turns over ``--repeats`` passes after an untimed warm-up pass (compiles
happen there), tokens/s median (min-max) of:
- ``generate()``: ``model.generate(ids, max_new_tokens=N)`` with the checkpoint's own
  generation config (streams on, tree "auto"): what a user gets by default;
- ``generate(compile_config)``: the same plus ``compile_config=CompileConfig()``;
- ``benchmark eager`` and ``benchmark compiled``: the benchmark's `spec_stream` engine
  (`spec_stream.engines.SpecStreamEngine`) with its step eager and compiled, as
  ``dataset_tps.py`` times it;
- ``plain``: ``speculative_streaming=False``, the reference every output must equal.
Prints each row, the user's over the benchmark's ratio for each mode (the target: within
10%), and exits 1 if an output differs from plain decoding. Run it on an idle machine.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import CompileConfig

from spec_stream.arithmetic import measure_machine
from spec_stream.benchmark.machine import machine_info
from spec_stream.checkpoints import load_for_inference
from spec_stream.cli_help import PlainDefaultsHelpFormatter
from spec_stream.data import load_examples
from spec_stream.engines import build_engine
from spec_stream.errors import exit_on_user_error, require_at_least_one

TOLERANCE = 0.10  # the user's call within 10% of the benchmark's row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=PlainDefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="a fine-tuned checkpoint folder (with streams)")
    parser.add_argument("--dataset", default="e2e_nlg", help="a preset: spider, dialogsum or e2e_nlg")
    parser.add_argument("--data-dir", default=None, help="local JSON-lines copies (default: the hub)")
    parser.add_argument("--num-samples", type=int, default=50, help="test prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per row")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    require_at_least_one(args, ("num_samples", "max_new_tokens", "repeats"))
    return args


def user_calls(model, max_new_tokens: int) -> dict:
    """The calls a user makes: name -> function of a prompt, returning its output ids."""
    return {
        "generate()": lambda ids: model.generate(ids, max_new_tokens=max_new_tokens),
        "generate(compile_config)": lambda ids: model.generate(ids, max_new_tokens=max_new_tokens,
                                                               compile_config=CompileConfig()),
        "plain": lambda ids: model.generate(ids, max_new_tokens=max_new_tokens, speculative_streaming=False),
    }


def benchmark_calls(checkpoint: str, max_new_tokens: int, eos_token_id) -> dict:
    """The benchmark's `spec_stream` engine, eager and compiled: name -> function of a prompt."""
    calls = {}
    for name, compiled in (("benchmark eager", False), ("benchmark compiled", True)):
        engine = build_engine("spec_stream", checkpoint, torch.device("cpu"), compile_step=compiled)
        calls[name] = lambda ids, engine=engine: torch.cat(
            [ids, torch.tensor([engine.run(ids, max_new_tokens, eos_token_id).new_tokens])], dim=1)
    return calls


def timed_pass(call, prompts) -> tuple[float, list[list[int]]]:
    """Tokens/s of one pass of ``call`` over ``prompts``, and each prompt's new tokens."""
    outputs, seconds = [], 0.0
    with torch.inference_mode(False):
        for ids in prompts:
            start = time.perf_counter()
            out = call(ids)
            seconds += time.perf_counter() - start
            outputs.append(out[0, ids.shape[1]:].tolist())
    return sum(len(new) for new in outputs) / seconds, outputs


def measure(calls: dict, prompts, repeats: int) -> tuple[dict, dict]:
    """A warm-up pass per call, then ``repeats`` passes taking turns: rates and outputs by name."""
    outputs = {name: timed_pass(call, prompts)[1] for name, call in calls.items()}
    rates = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            rates[name].append(timed_pass(call, prompts)[0])
    return rates, outputs


def until_eos(tokens: list[int], eos_token_id) -> list[int]:
    return tokens[: tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    model, tokenizer = load_for_inference(args.model, require_streams=True)
    examples = load_examples(args.dataset, "test", data_dir=args.data_dir, limit=args.num_samples)
    prompts = [tokenizer(example.prompt, return_tensors="pt").input_ids for example in examples]
    eos = model.generation_config.eos_token_id
    calls = {**user_calls(model, args.max_new_tokens), **benchmark_calls(args.model, args.max_new_tokens, eos)}
    rates, outputs = measure(calls, prompts, args.repeats)
    probe, machine = measure_machine("cpu"), machine_info(torch.device("cpu"))
    print(f"{args.model}, {len(prompts)} {args.dataset} prompts x {args.max_new_tokens} tokens, {args.repeats} passes; "
          f"{machine['cpu']} (L3 {machine['l3_cache']}), {probe.threads} threads, matmul {probe.matmul_flops_per_second / 1e9:.0f} GFLOP/s, memory read "
          f"{probe.read_bytes_per_second / 1e9:.1f} GB/s")
    for name, values in rates.items():
        same = sum(until_eos(a, eos) == until_eos(b, eos) for a, b in zip(outputs[name], outputs["plain"]))
        print(f"  {name:<26} {statistics.median(values):7.1f} tok/s ({min(values):.1f}-{max(values):.1f})  "
              f"= plain: {same}/{len(prompts)}")
    for user, bench in (("generate()", "benchmark eager"), ("generate(compile_config)", "benchmark compiled")):
        ratio = statistics.median(rates[user]) / statistics.median(rates[bench])
        print(f"  {user} / {bench}: {ratio:.3f}x ({'within' if abs(ratio - 1) <= TOLERANCE else 'outside'} "
              f"{TOLERANCE:.0%})")
    identical = all(until_eos(a, eos) == until_eos(b, eos) for name in outputs
                    for a, b in zip(outputs[name], outputs["plain"]))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
