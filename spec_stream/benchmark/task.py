"""One task benchmarked: every engine at every batch size on the same prompts, `naive`
first, each row with its figures, its exactness and its speedup over `naive`."""
from __future__ import annotations

import gc

import torch

from spec_stream.arithmetic import MachineProbe
from spec_stream.benchmark.distribution_check import check_distributions
from spec_stream.benchmark.exactness import check_plain_decoding, exactness, model_key, naive_batch1_outputs
from spec_stream.benchmark.inputs import TaskInputs
from spec_stream.benchmark.measure import measure, summarize
from spec_stream.benchmark.settings import BenchmarkSettings
from spec_stream.engines import Unsupported, build_engine


def benchmark_task(inputs: TaskInputs, settings: BenchmarkSettings,
                   probe: MachineProbe) -> tuple[list[dict], list[dict]]:
    """Every engine at every batch size on the same prompts of one task, `naive` first (on
    the reference model): its rows, and the (engine, batch size) pairs it skipped, with why."""
    eos = inputs.tokenizer.eos_token_id
    check_plain_decoding(inputs, settings)
    print(f"{inputs.task}: benchmarking on {inputs.task}/{inputs.split} ({len(inputs.prompts)} prompts, "
          f"{settings.repeats} timed passes, checkpoint {inputs.checkpoint}, reference {inputs.reference})")
    rows, outputs, skipped, naive_outputs, known = [], [], [], None, {}
    for name in settings.engines:
        engine = build_engine(name, inputs.reference if name == "naive" else inputs.checkpoint, settings.device,
                              half_dtype=settings.half_dtype, sampling=settings.sampling,
                              draft_model=settings.draft_model, tree_widths=settings.tree_widths,
                              cuda_graphs=settings.cuda_graphs, lookup_branch=settings.lookup_branch_for(inputs.task))
        if naive_outputs is None and settings.batch_sizes[0] != 1:
            naive_outputs = naive_batch1_outputs(engine, inputs, settings)
        for batch_size in settings.batch_sizes:
            try:
                passes = measure(engine, inputs.prompts, settings, eos, batch_size,
                                 f"{inputs.task}/{engine.name}/batch {batch_size}")
            except Unsupported as reason:
                skipped.append({"engine": engine.name, "dataset": inputs.task, "batch_size": batch_size,
                                "reason": str(reason)})
                continue
            tokens = [r.new_tokens for r in passes[0]]
            if naive_outputs is None:  # naive at batch 1 runs first
                naive_outputs = tokens
            if name == "naive" and not settings.do_sample:  # upstream greedy of the fp32 reference model
                known.setdefault(model_key(engine), naive_outputs)
            rows.append({**summarize(engine, inputs, passes, probe, batch_size),
                         **exactness(engine, tokens, naive_outputs, inputs, settings, known)})
            outputs.append(tokens)
        del engine
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    naive_rates = {row["batch_size"]: row["tokens_per_second"] for row in rows if row["engine"] == "naive"}
    for row in rows:
        row["speedup_vs_naive"] = row["tokens_per_second"] / naive_rates[row["batch_size"]]
    if settings.do_sample:
        check_distributions(rows, outputs, naive_outputs, inputs, settings)
    return rows, skipped
