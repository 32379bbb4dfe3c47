"""Measurement loop behind `dataset_tps.py`: same prompts for every engine, warm-up
excluded, device synchronised around each timed call, figures gathered into rows."""
from __future__ import annotations

import gc
import logging
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from spec_stream.data import TASKS, load_examples
from spec_stream.engines import Engine, GenerationResult, build_engine
from spec_stream.timing import synchronize
from spec_stream.errors import UserError
from spec_stream.metrics import task_quality

log = logging.getLogger("spec_stream.benchmark")

# Default checkpoints, prepared once per dataset with the fine-tuning code and reused.
DEFAULT_RECIPES = {
    "cpu": dict(size="tiny", max_train_samples=1500, epochs=2),
    "cuda": dict(size="125M", max_train_samples=None, epochs=1),
}


@dataclass
class Prompt:
    ids: torch.Tensor  # (1, length)
    references: list[str]
    truncated: bool


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def default_checkpoint(task: str, device: torch.device, root: Path, data_dir: str | None) -> Path:
    """The fine-tuned checkpoint for ``task`` sized for the device: prepared on first use
    (from scratch, since offline machines reach no pretrained weights), reused after."""
    from spec_stream.finetune import build_parser, finetune

    recipe = DEFAULT_RECIPES["cuda" if device.type == "cuda" else "cpu"]
    output = root / f"{task}-{recipe['size']}"
    if (output / "training_args.json").is_file():
        return output
    print(f"preparing the default {recipe['size']} checkpoint for {task} in {output} "
          f"(fine-tuning from scratch, once; pass --model to use your own)")
    argv = ["--dataset", task, "--output", str(output), "--from-scratch", recipe["size"],
            "--epochs", str(recipe["epochs"]), "--resume"]
    if recipe["max_train_samples"]:
        argv += ["--max-train-samples", str(recipe["max_train_samples"])]
    if data_dir:
        argv += ["--data-dir", str(data_dir)]
    finetune(build_parser().parse_args(argv))
    return output


def load_prompts(task: str, split: str, tokenizer, data_dir, num_samples: int, context: int,
                 max_new_tokens: int) -> list[Prompt]:
    """Benchmark prompts; a prompt longer than ``context - max_new_tokens`` keeps its end."""
    room = context - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens; lower --max-new-tokens")
    prompts = []
    for example in load_examples(task, split, data_dir=data_dir, limit=num_samples):
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids
        prompts.append(Prompt(ids[:, -room:], example.references, ids.shape[1] > room))
    if not prompts:
        raise UserError(f"{task}/{split} gave no examples; check --data-dir")
    return prompts


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def measure_copy_rate(device: torch.device, megabytes: int = 256, repeats: int = 10) -> float:
    """Bytes per second a large on-device copy moves (read + write): the yardstick for the
    memory-bandwidth limit of a decode step, which must read every weight once."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * repeats / (time.perf_counter() - start)


def measure(engine: Engine, prompts: list[Prompt], max_new_tokens: int, eos_token_id: int | None,
            label: str) -> list[GenerationResult]:
    """Warm up on the first prompt (not timed), then time every prompt."""
    engine.run(prompts[0].ids, min(max_new_tokens, 8), eos_token_id)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    return [engine.run(p.ids, max_new_tokens, eos_token_id) for p in tqdm(prompts, desc=label, leave=False)]


def summarize(engine: Engine, task: str, prompts, results: list[GenerationResult], tokenizer,
              reference_outputs: list[list[int]] | None, copy_rate: float) -> dict:
    tokens = sum(len(r.new_tokens) for r in results)
    seconds = sum(r.seconds for r in results)
    calls = sum(r.forward_calls for r in results)
    drafted = sum(r.drafted for r in results)
    predictions = [tokenizer.decode(r.new_tokens, skip_special_tokens=True).strip() for r in results]
    row = {
        "engine": engine.name,
        "dataset": task,
        "backend": engine.description,
        "samples": len(results),
        "truncated_prompts": sum(p.truncated for p in prompts),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "peak_memory_mb": peak_memory_mb(engine.device),
        "forward_calls": calls,
        "tokens_per_call": tokens / calls,
        # weights read per second (each forward call reads them all) against the copy rate
        "weight_gb_per_second": engine.weight_bytes * calls / seconds / 1e9,
        "bandwidth_share": engine.weight_bytes * calls / seconds / copy_rate,
        "acceptance_rate": sum(r.accepted for r in results) / drafted if drafted else None,
        "quality": task_quality(task, predictions, [p.references for p in prompts]),
        "identical_to_naive": None,
        "speedup_vs_naive": None,
        "step_seconds": _sum_steps(results),
        "outputs": predictions,
    }
    if reference_outputs is not None:
        same = sum(r.new_tokens == ref for r, ref in zip(results, reference_outputs))
        row["identical_to_naive"] = same / len(results)
    return row


def _sum_steps(results):
    total: dict[str, float] = {}
    for result in results:
        for name, seconds in result.step_seconds.items():
            total[name] = total.get(name, 0.0) + seconds
    return total or None


def benchmark_task(task: str, engines: list[str], checkpoint: Path, args, device: torch.device) -> list[dict]:
    """Every engine on the same prompts of one task; `naive` first, as the reference."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    split = args.split or TASKS[task].benchmark_split
    prompts = load_prompts(task, split, tokenizer, args.data_dir, args.num_samples,
                           config.max_position_embeddings, args.max_new_tokens)
    print(f"{task}: benchmarking on {task}/{split} ({len(prompts)} prompts, checkpoint {checkpoint})")
    rows, naive_outputs = [], None
    for name in engines:
        engine = build_engine(name, str(checkpoint), device, half_dtype=args.half_dtype,
                              draft_model=args.draft_model, tree_widths=args.tree_widths,
                              cuda_graphs=args.cuda_graphs)
        results = measure(engine, prompts, args.max_new_tokens, tokenizer.eos_token_id, f"{task}/{name}")
        row = summarize(engine, task, prompts, results, tokenizer, naive_outputs, args.copy_rate)
        if name == "naive":
            naive_outputs = [r.new_tokens for r in results]
            row["identical_to_naive"] = 1.0
        rows.append(row)
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    naive = next((r for r in rows if r["engine"] == "naive"), None)
    for row in rows:
        if naive:
            row["speedup_vs_naive"] = row["tokens_per_second"] / naive["tokens_per_second"]
        row["split"] = split
    return rows
