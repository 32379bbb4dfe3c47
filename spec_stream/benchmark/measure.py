"""Timing an engine (a warm-up, then timed passes over every prompt) and one report row's
figures: speed with its spread, calls, acceptance, memory, the roofline bound, quality."""
from __future__ import annotations

import resource

import numpy as np
import torch
from tqdm.auto import tqdm

from spec_stream.arithmetic import MachineProbe, predicted_bound
from spec_stream.benchmark.inputs import Prompt, TaskInputs
from spec_stream.benchmark.settings import BenchmarkSettings
from spec_stream.data import is_preset
from spec_stream.engines import Engine, GenerationResult
from spec_stream.metrics import bleu, repetition_rate, rouge_l, task_quality


def measure(engine: Engine, prompts: list[Prompt], settings: BenchmarkSettings, eos_token_id: int | None,
            batch_size: int, label: str) -> list[list[GenerationResult]]:
    """Settle the engine for ``batch_size`` (`Engine.use_batch_size`: an "auto" tree is
    chosen for it), warm up on the first batch (untimed), then time every prompt in each of
    ``settings.repeats`` passes (`Engine.run_many` at ``batch_size``): ``passes[repeat][prompt]``.
    `Unsupported` when the engine cannot take the batch."""
    ids = [p.ids for p in prompts]
    engine.use_batch_size(batch_size)
    engine.run_many(ids[:batch_size], settings.max_new_tokens, eos_token_id, batch_size)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    passes = []
    for _ in tqdm(range(settings.repeats), desc=label, leave=False):
        passes.append(engine.run_many(ids, settings.max_new_tokens, eos_token_id, batch_size))
    return passes


def timing_figures(passes: list[list[GenerationResult]]) -> dict:
    """Median tokens/s over the passes, its spread, and every prompt's record."""
    tokens = [sum(len(r.new_tokens) for r in results) for results in passes]
    seconds = [sum(r.seconds for r in results) for results in passes]
    rates = [t / s for t, s in zip(tokens, seconds)]
    latencies = [float(np.mean([r.latency for r in results])) for results in passes]
    low, q1, median, q3, high = (float(x) for x in np.percentile(rates, [0, 25, 50, 75, 100]))
    per_prompt = list(zip(*passes))
    return {
        "repeats": len(passes),
        "tokens_per_second": median,
        "tokens_per_second_spread": {"min": low, "q1": q1, "q3": q3, "max": high, "iqr": q3 - q1},
        "tokens_per_second_per_repeat": rates,
        "seconds": tokens[0] / median,  # one pass at the median rate
        "seconds_per_repeat": seconds,
        "latency_seconds": float(np.median(latencies)),
        "latency_seconds_per_repeat": latencies,
        "repeats_agree": all(r.new_tokens == runs[0].new_tokens for runs in per_prompt for r in runs),
        "prompts": [{"tokens": len(runs[0].new_tokens), "forward_calls": runs[0].forward_calls,
                     "seconds": [r.seconds for r in runs]} for runs in per_prompt],
    }


def summarize(engine: Engine, inputs: TaskInputs, passes: list[list[GenerationResult]], probe: MachineProbe,
              batch_size: int) -> dict:
    """One row: speed with its spread, calls, acceptance, quality, repetition, the bound."""
    first = passes[0]
    timing = timing_figures(passes)
    tokens = sum(len(r.new_tokens) for r in first)
    calls = sum(r.forward_calls for r in first)
    drafted = sum(r.drafted for r in first)
    predictions = [inputs.tokenizer.decode(r.new_tokens, skip_special_tokens=True).strip() for r in first]
    references = [p.references for p in inputs.prompts]
    databases = [p.database for p in inputs.prompts]
    databases = databases if inputs.task == "spider" and None not in databases else None
    weights_per_second = engine.weight_bytes * calls / timing["seconds"]  # each call reads every weight
    return {
        "engine": engine.name, "dataset": inputs.task, "split": inputs.split, "backend": engine.description,
        "batch_size": batch_size, "samples": len(first), "truncated_prompts": sum(p.truncated for p in inputs.prompts),
        "new_tokens": tokens, **timing,
        "peak_memory_mb": peak_memory_mb(engine.device),
        "forward_calls": calls, "tokens_per_call": tokens / calls,
        "weight_gb_per_second": weights_per_second / 1e9,
        "bandwidth_share": weights_per_second / probe.copy_bytes_per_second,
        "predicted_ms_per_token": predicted_ms_per_token(engine, inputs, tokens / calls, probe, batch_size),
        "call_seconds_by_step": call_seconds_by_step(first),
        "acceptance_rate": sum(r.accepted for r in first) / drafted if drafted else None,
        "accepted_from_lookup": sum(r.accepted_from_lookup for r in first),  # drafts accepted, by source
        "accepted_from_streams": sum(r.accepted - r.accepted_from_lookup for r in first),
        "lookup_branch": getattr(engine, "lookup_branch", None),
        "tree_widths": list(engine.tree_widths) if hasattr(engine, "tree_widths") else None,
        "trees_used": {",".join(map(str, w)) or "none": n for w, n in engine.trees_used.items()}
        if hasattr(engine, "trees_used") else None,  # calls per tree over every pass: "auto" chooses per request
        "quality": quality(inputs.task, predictions, references, databases),
        "repetition": repetition_rate(predictions, references),
        "step_seconds": step_seconds_per_pass(passes),
        "outputs": predictions,
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def step_seconds_per_pass(passes: list[list[GenerationResult]]) -> dict[str, float] | None:
    """Seconds per named step section (spec_stream's draft / forward / verify), summed over
    a pass and averaged over the passes; None for engines that report none."""
    total: dict[str, float] = {}
    for results in passes:
        for result in results:
            for name, seconds in result.step_seconds.items():
                total[name] = total.get(name, 0.0) + seconds / len(passes)
    return total or None


def predicted_ms_per_token(engine: Engine, inputs: TaskInputs, tokens_per_call: float, probe: MachineProbe,
                           batch_size: int) -> dict:
    """The roofline's fastest time per token for this engine's model, weight format and
    batch (`arithmetic.predicted_bound`, at the mean context of a step); a call that gains
    several tokens reads the weights once for all of them."""
    context = sum(p.ids.shape[1] for p in inputs.prompts) // len(inputs.prompts)
    bound = predicted_bound(engine.model.config, engine.weight_format, batch_size, probe, context=context)
    return {"ms": 1e3 * bound["seconds"] / tokens_per_call, "bound": bound["bound"]}


def call_seconds_by_step(results: list[GenerationResult]) -> list[float]:
    """Median over prompts of the i-th forward call's seconds (call 0 is the prefill): how
    a step's cost grows with the sequence (the KV cache's effect, next to `no_cache`)."""
    steps = max(len(r.call_seconds) for r in results)
    return [float(np.median([r.call_seconds[i] for r in results if len(r.call_seconds) > i])) for i in range(steps)]


def quality(task: str, predictions: list[str], references: list[list[str]], databases) -> dict[str, float]:
    """The preset's metrics (`metrics.task_quality`); ROUGE-L and BLEU against the response
    field for your own data (``{}`` for no predictions)."""
    if is_preset(task):
        return task_quality(task, predictions, references, databases)
    return {"rougeL": rouge_l(predictions, references), "bleu": bleu(predictions, references)} if predictions else {}
