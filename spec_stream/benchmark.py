"""Measurement loop behind `dataset_tps.py`: the same prompts for every engine, every
input checked before the first engine starts, figures gathered into rows.

Timing. Per engine, one warm-up prompt (untimed), then ``repeats`` timed passes over all
prompts, the device synchronised around each call. A pass's rate is its tokens over its
seconds; a row reports the median rate over the passes (``tokens_per_second``) with their
spread (min, quartiles, max, IQR) and keeps each prompt's tokens, forward calls and
seconds per pass. Counts, outputs and quality come from the first pass (greedy decoding
gives the same tokens in every pass; ``repeats_agree`` checks it).

Exactness. ``identical_to_greedy`` compares an engine's outputs with greedy decoding
(upstream `generate`, ``do_sample=False``, untimed) of the *same* model: the engine's own
weights, attention implementation and weight format (dtype, or int8). That is the output
an exact engine must reproduce. ``identical_to_naive`` compares with fp32 `naive` and so
adds the effects of the format (half precision on a GPU, int8) and of the attention
kernel: it is reported apart.

Which attention paths are bit-stable in half precision. A tree step verifies every node
in one call: each query attends over the cache plus the whole tree, other nodes' keys
masked out, where a greedy step attends over the cache plus one token without a mask. In
fp32 both agree to about 1e-6 and outputs match greedy decoding. In fp16/bf16:

- eager (``eager_attention``, GPT-Neo's reference) is stable in practice: it computes
  scores and softmax in fp32 from half inputs (products of half values are exact in fp32,
  masked keys add exact zeros), so only the final ``weights @ V`` runs in half, and a
  query's result seldom depends on the call's other rows or masked keys (random inputs on
  the development CPU, torch 2.13: 0 of 300 bf16 rows and 1 of 300 fp16 rows differed, by
  one half-precision step; spec_stream matched greedy on 120 of 120 random-model prompts
  in bf16 and in fp16). Not bit-exact by construction, though.
- SDPA is not: its fused kernels tile the keys into blocks and accumulate the softmax
  block by block in rounded steps, and the kernel and tiling follow the key length and
  the presence of a mask, so the same query over the same visible keys rounds differently
  in a tree step than in a one-token step (same probe: 2 of 300 bf16 rows, 17 of 300 fp16
  rows differed). At a near-tie of the top two logits the argmax flips: on the same
  random models, 6 of 120 bf16 prompts (5%) and 0 of 120 fp16 prompts differed from
  greedy decoding of the same SDPA model.
GPU kernels were not measured here (no GPU was lent); the same reasoning applies to them.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import platform
import resource
import sqlite3
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from spec_stream import GPTNeoForCausalLM
from spec_stream.checkpoints import load_for_inference
from spec_stream.data import (DATA_DIR_ENV, SPIDER_TABLES_ENV, CustomDataset, default_split, is_preset, load_examples,
                              load_spider_schemas)
from spec_stream.arithmetic import MachineProbe, predicted_bound
from spec_stream.defaults import BATCH_SIZES
from spec_stream.engines import ENGINES, Engine, GenerationResult, build_engine, plain_decoding
from spec_stream.errors import UserError
from spec_stream.metrics import bleu, repetition_rate, rouge_l, spider_database, task_quality


REPORT_SCHEMA_VERSION = 1  # the report's layout, documented field by field in docs/report.md


@dataclass(frozen=True)
class BenchmarkSettings:
    """What a benchmark run measures, checked by `dataset_tps.py`'s parser."""

    engines: tuple[str, ...]  # `naive` first: the fp32 reference
    datasets: tuple[str | CustomDataset, ...]  # presets' names, or one dataset of the user's
    device: torch.device
    num_samples: int
    max_new_tokens: int
    repeats: int
    tree_widths: tuple[int, ...]
    half_dtype: torch.dtype
    output: Path
    model: str | None = None  # one checkpoint for every dataset; None: the default ones
    checkpoint_dir: Path = Path("checkpoints")
    data_dir: str | None = None
    split: str | None = None  # None: each task's benchmark split
    draft_model: str | None = None
    cuda_graphs: bool = True

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["datasets"] = [d if isinstance(d, str) else asdict(d) for d in self.datasets]
        return {k: str(v) if isinstance(v, (torch.device, torch.dtype, Path)) else v for k, v in values.items()}


@dataclass
class Prompt:
    ids: torch.Tensor  # (1, length)
    references: list[str]
    truncated: bool
    database: sqlite3.Connection | None = None  # spider: an empty database with the prompt's schema


@dataclass
class TaskInputs:
    """One dataset, checked and loaded before any engine runs."""

    task: str
    split: str
    checkpoint: str
    tokenizer: object
    prompts: list[Prompt]


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


def default_checkpoint(task: str | CustomDataset, device: torch.device, root: Path, data_dir: str | None) -> Path:
    """The fine-tuned checkpoint for ``task`` sized for the device: prepared on first use
    (from scratch, since offline machines reach no pretrained weights), reused after. Your
    own data gets a folder named after it and a digest of its source and templates."""
    from spec_stream import defaults
    from spec_stream.checkpoints import TRAINING_ARGS
    from spec_stream.finetune import FinetuneConfig, finetune

    recipe = defaults.DEFAULT_RECIPES["cuda" if device.type == "cuda" else "cpu"]
    custom = asdict(task) if isinstance(task, CustomDataset) else {}
    if custom:
        digest = hashlib.sha256(json.dumps(custom, sort_keys=True).encode()).hexdigest()[:8]
        output = root / f"{task.name}-{digest}-{recipe['size']}"
        task = custom.pop("source")
    else:
        output = root / f"{task}-{recipe['size']}"
    if (output / TRAINING_ARGS).is_file():
        return output
    print(f"preparing the default {recipe['size']} checkpoint for {task} in {output} "
          f"(fine-tuning from scratch, once; pass --model to use your own)")
    finetune(FinetuneConfig(dataset=task, output=str(output), data_dir=data_dir, from_scratch=recipe["size"],
                            epochs=float(recipe["epochs"]), max_train_samples=recipe["max_train_samples"],
                            resume=True, **custom))
    return output


def uses_streams(engines: tuple[str, ...]) -> bool:
    """Whether any of ``engines`` drafts with the speculative streams (takes a tree)."""
    return any("tree_widths" in ENGINES[name].settings for name in engines)


def check_tree_depth(tree_widths: tuple[int, ...], num_streams: int, checkpoint: str) -> None:
    """A UserError unless the spec_stream tree has at most one level per stream of the model."""
    if len(tree_widths) > num_streams:
        widths = ",".join(map(str, tree_widths))
        raise UserError(f"--tree-widths {widths} has {len(tree_widths)} levels but {checkpoint} has {num_streams} "
                        f"speculative streams; pass at most {num_streams} widths, e.g. --tree-widths "
                        f"{','.join(map(str, tree_widths[:num_streams]))}")


def spider_tables_path(data_dir: str | None) -> Path | None:
    """The tables.json that `load_examples` read the schemas from (it checked that one
    exists), or None: Spider from the hub without one (schema-free prompts)."""
    root = data_dir or os.environ.get(DATA_DIR_ENV)
    if root:
        return Path(root).expanduser() / "spider" / "tables.json"
    return Path(os.environ[SPIDER_TABLES_ENV]) if os.environ.get(SPIDER_TABLES_ENV) else None


def spider_databases(prompts_text: list[str], data_dir: str | None) -> list[sqlite3.Connection | None]:
    """An empty SQLite database per Spider prompt, with the schema of the prompt's database.

    Examples carry no ``db_id``; a prompt holds its database's schema text as
    `load_spider_schemas` writes it, so the longest schema text found in the prompt names
    the database. Databases whose schema texts are equal have the same tables and columns,
    so whichever is picked judges every query alike.
    """
    tables_path = spider_tables_path(data_dir)
    if tables_path is None:  # no schemas: SQL validity cannot be judged
        return [None] * len(prompts_text)
    entries = {entry["db_id"]: entry for entry in json.loads(tables_path.read_text(encoding="utf-8"))}
    schemas = sorted(load_spider_schemas(tables_path).items(), key=lambda item: -len(item[1]))
    built: dict[str, sqlite3.Connection] = {}
    databases = []
    for text in prompts_text:
        db_id = next(db_id for db_id, schema in schemas if schema in text)
        if db_id not in built:
            built[db_id] = spider_database(entries[db_id])
        databases.append(built[db_id])
    return databases


def load_prompts(task: str | CustomDataset, split: str, tokenizer, context: int,
                 settings: BenchmarkSettings) -> list[Prompt]:
    """Benchmark prompts; a prompt longer than ``context - max_new_tokens`` keeps its end."""
    room = context - settings.max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {settings.max_new_tokens} leaves no room for a prompt in the model's "
                        f"context of {context} tokens; lower --max-new-tokens")
    examples = load_examples(task, split, data_dir=settings.data_dir, limit=settings.num_samples)
    if not examples:
        raise UserError(f"{dataset_label(task)}/{split} gave no examples; check --data-dir and --split")
    texts = [example.prompt for example in examples]
    databases = spider_databases(texts, settings.data_dir) if task == "spider" else [None] * len(examples)
    prompts = []
    for example, database in zip(examples, databases):
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids
        prompts.append(Prompt(ids[:, -room:], example.references, ids.shape[1] > room, database))
    return prompts


def dataset_label(task: str | CustomDataset) -> str:
    """The report's "dataset": a preset's name, or your own data's file or hub id as given."""
    return task.source if isinstance(task, CustomDataset) else task


def quality(task: str, predictions: list[str], references: list[list[str]], databases) -> dict[str, float]:
    """The preset's metrics (`metrics.task_quality`); ROUGE-L and BLEU against the response
    field for your own data (``{}`` for no predictions)."""
    if is_preset(task):
        return task_quality(task, predictions, references, databases)
    return {"rougeL": rouge_l(predictions, references), "bleu": bleu(predictions, references)} if predictions else {}


def prepare_task(task: str | CustomDataset, checkpoint: str, settings: BenchmarkSettings) -> TaskInputs:
    """Check ``checkpoint`` for ``task`` (loadable, streams when spec_stream runs, a tree
    it can draft) and load the prompts: every failure a UserError, before any engine runs."""
    needs_streams = uses_streams(settings.engines)
    model, tokenizer = load_for_inference(checkpoint, require_streams=needs_streams)
    config = model.config
    del model
    if needs_streams:
        check_tree_depth(settings.tree_widths, config.num_spec_streams, checkpoint)
    split = settings.split or default_split(task, "test")
    prompts = load_prompts(task, split, tokenizer, config.max_position_embeddings, settings)
    return TaskInputs(dataset_label(task), split, checkpoint, tokenizer, prompts)


def check_draft_model(draft_model: str) -> None:
    """A UserError now, not after other engines ran, if the draft model cannot be loaded."""
    load_for_inference(draft_model)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


def measure(engine: Engine, prompts: list[Prompt], settings: BenchmarkSettings, eos_token_id: int | None,
            label: str) -> list[list[GenerationResult]]:
    """Warm up on the first prompt (untimed), then time every prompt in each of
    ``settings.repeats`` passes (`Engine.run_many`: one by one, or in batches):
    ``passes[repeat][prompt]``."""
    engine.run_many([prompts[0].ids], settings.max_new_tokens, eos_token_id)
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    passes = []
    for _ in tqdm(range(settings.repeats), desc=label, leave=False):
        passes.append(engine.run_many([p.ids for p in prompts], settings.max_new_tokens, eos_token_id))
    return passes


def timing_figures(passes: list[list[GenerationResult]]) -> dict:
    """Median tokens/s over the passes, its spread, and every prompt's record."""
    tokens = [sum(len(r.new_tokens) for r in results) for results in passes]
    seconds = [sum(r.seconds for r in results) for results in passes]
    rates = [t / s for t, s in zip(tokens, seconds)]
    low, q1, median, q3, high = (float(x) for x in np.percentile(rates, [0, 25, 50, 75, 100]))
    per_prompt = list(zip(*passes))
    return {
        "repeats": len(passes),
        "tokens_per_second": median,
        "tokens_per_second_spread": {"min": low, "q1": q1, "q3": q3, "max": high, "iqr": q3 - q1},
        "tokens_per_second_per_repeat": rates,
        "seconds": tokens[0] / median,  # one pass at the median rate
        "seconds_per_repeat": seconds,
        "repeats_agree": all(r.new_tokens == runs[0].new_tokens for runs in per_prompt for r in runs),
        "prompts": [{"tokens": len(runs[0].new_tokens), "forward_calls": runs[0].forward_calls,
                     "seconds": [r.seconds for r in runs]} for runs in per_prompt],
    }


def step_seconds_per_pass(passes: list[list[GenerationResult]]) -> dict[str, float] | None:
    """Seconds per named step section (spec_stream's draft / forward / verify), summed over
    a pass and averaged over the passes; None for engines that report none."""
    total: dict[str, float] = {}
    for results in passes:
        for result in results:
            for name, seconds in result.step_seconds.items():
                total[name] = total.get(name, 0.0) + seconds / len(passes)
    return total or None


def share_identical(outputs: list[list[int]], reference: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(outputs, reference)) / len(outputs)


def predicted_ms_per_token(engine: Engine, inputs: TaskInputs, tokens_per_call: float, probe: MachineProbe) -> dict:
    """The roofline's fastest time per token for this engine's model, weight format and
    batch (`arithmetic.predicted_bound`, at the mean context of a step); a call that gains
    several tokens reads the weights once for all of them."""
    context = sum(p.ids.shape[1] for p in inputs.prompts) // len(inputs.prompts)
    bound = predicted_bound(engine.model.config, engine.weight_format, getattr(engine, "batch_size", None) or 1,
                            probe, context=context)
    return {"ms": 1e3 * bound["seconds"] / tokens_per_call, "bound": bound["bound"]}


def call_seconds_by_step(results: list[GenerationResult]) -> list[float]:
    """Median over prompts of the i-th forward call's seconds (call 0 is the prefill): how
    a step's cost grows with the sequence (the KV cache's effect, next to `no_cache`)."""
    steps = max(len(r.call_seconds) for r in results)
    return [float(np.median([r.call_seconds[i] for r in results if len(r.call_seconds) > i])) for i in range(steps)]


def summarize(engine: Engine, inputs: TaskInputs, passes: list[list[GenerationResult]], probe: MachineProbe) -> dict:
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
        "samples": len(first), "truncated_prompts": sum(p.truncated for p in inputs.prompts),
        "new_tokens": tokens, **timing,
        "peak_memory_mb": peak_memory_mb(engine.device),
        "forward_calls": calls, "tokens_per_call": tokens / calls,
        "weight_gb_per_second": weights_per_second / 1e9,
        "bandwidth_share": weights_per_second / probe.copy_bytes_per_second,
        "predicted_ms_per_token": predicted_ms_per_token(engine, inputs, tokens / calls, probe),
        "call_seconds_by_step": call_seconds_by_step(first),
        "acceptance_rate": sum(r.accepted for r in first) / drafted if drafted else None,
        "quality": quality(inputs.task, predictions, references, databases),
        "repetition": repetition_rate(predictions, references),
        "step_seconds": step_seconds_per_pass(passes),
        "outputs": predictions,
    }


@torch.no_grad()
def greedy_outputs(model, prompts: list[Prompt], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    """Upstream greedy `generate` of ``model`` as it is (weights, attention, dtype), untimed."""
    outputs = []
    for prompt in prompts:
        ids = prompt.ids.to(model.device)
        sequences = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                                   **plain_decoding(model))
        outputs.append(sequences[0, ids.shape[1]:].tolist())
    return outputs


def model_key(engine: Engine) -> tuple[str, str, str]:
    """What decides an engine's greedy output: model code, attention and weight format."""
    model = engine.model
    owner = "spec-stream" if isinstance(model, GPTNeoForCausalLM) else "upstream"
    return owner, model.config._attn_implementation, engine.weight_format


def greedy_reference(engine: Engine, prompts: list[Prompt], max_new_tokens: int, eos_token_id: int | None,
                     known: dict) -> list[list[int]]:
    """Greedy decoding of the engine's own model in its own weight format: what an exact
    engine must reproduce. Computed once per `model_key` and kept in ``known`` (which
    `naive`'s outputs seed: they are upstream greedy of the fp32 model)."""
    key = model_key(engine)
    if key not in known:
        known[key] = greedy_outputs(engine.model, prompts, max_new_tokens, eos_token_id)
    return known[key]


def engine_builds(engines: tuple[str, ...]) -> list[tuple[str, int | None]]:
    """(engine, batch size) per report row: `batched` once per size in BATCH_SIZES."""
    return [(name, size) for name in engines for size in (BATCH_SIZES if name == "batched" else (None,))]


def benchmark_task(inputs: TaskInputs, settings: BenchmarkSettings, probe: MachineProbe) -> list[dict]:
    """Every engine on the same prompts of one task; `naive` first, as the fp32 reference."""
    eos = inputs.tokenizer.eos_token_id
    print(f"{inputs.task}: benchmarking on {inputs.task}/{inputs.split} ({len(inputs.prompts)} prompts, "
          f"{settings.repeats} timed passes, checkpoint {inputs.checkpoint})")
    rows, naive_outputs, references = [], None, {}
    for name, batch_size in engine_builds(settings.engines):
        engine = build_engine(name, inputs.checkpoint, settings.device, half_dtype=settings.half_dtype,
                              draft_model=settings.draft_model, tree_widths=settings.tree_widths,
                              cuda_graphs=settings.cuda_graphs, batch_size=batch_size)
        passes = measure(engine, inputs.prompts, settings, eos, f"{inputs.task}/{engine.name}")
        outputs = [r.new_tokens for r in passes[0]]
        if naive_outputs is None:  # naive runs first: upstream greedy of the fp32 model
            naive_outputs = references[model_key(engine)] = outputs
        reference = greedy_reference(engine, inputs.prompts, settings.max_new_tokens, eos, references)
        owner, attention, weights = model_key(engine)
        rows.append({**summarize(engine, inputs, passes, probe),
                     "greedy_reference": f"greedy generate of the {owner} model ({attention}, {weights})",
                     "identical_to_greedy": share_identical(outputs, reference),
                     "identical_to_naive": share_identical(outputs, naive_outputs)})
        del engine
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["speedup_vs_naive"] = row["tokens_per_second"] / rows[0]["tokens_per_second"]
    return rows
