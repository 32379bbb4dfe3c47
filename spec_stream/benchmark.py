"""Measurement loop behind `dataset_tps.py`: the same prompts for every engine, every
input checked before the first engine starts, figures gathered into rows.

Timing. Per engine and batch size, one warm-up batch (untimed: the first prompt at batch 1),
then ``repeats`` timed passes over all prompts, the device synchronised around each call.
A pass's rate is its tokens over its seconds (at batch B: every row's tokens over the
batches' seconds, the throughput); a row reports the median rate over the passes
(``tokens_per_second``) with their spread (min, quartiles, max, IQR), the mean latency of
a prompt (its batch's seconds), and keeps each prompt's tokens, forward calls and seconds
per pass. Counts, outputs and quality come from the first pass (greedy decoding, and
sampling with its per-prompt seeds, give the same tokens in every pass; ``repeats_agree``
checks it).

Batches (``batch_sizes``). Every engine runs at every batch size, prompts grouped in order
and left-padded; engines that cannot take a batch are listed as skipped with the reason.
``speedup_vs_naive`` is over `naive` at the same batch size (upstream batched greedy).

Exactness. ``identical_to_greedy`` compares an engine's outputs with greedy decoding
(upstream `generate`, ``do_sample=False``, untimed) of the *same* model: the engine's own
weights, attention implementation and weight format (dtype, or int8). That is the output
an exact engine must reproduce. ``identical_to_naive`` compares with fp32 `naive` and so
adds the effects of the format (half precision on a GPU, int8) and of the attention
kernel: it is reported apart. Both compare with batch-1 outputs, whatever the row's batch
size. `naive` runs the reference model when one is given (``reference_model``: say the
checkpoint a frozen-base fine-tuning started from, loaded with upstream transformers), so
``identical_to_naive`` then asks whether the engine reproduces that original model.

Sampling (``do_sample``). Every engine samples with the same temperature, top-k and top-p;
prompt i (or the batch starting at prompt i) draws from torch's generators seeded with
``seed + i``. Samples cannot be compared token for token across decoders, so
``identical_to_greedy`` is null and ``distribution_check`` asks whether an engine's samples
come from naive's distribution: the mean log-probability per token of each prompt's sample
under the reference model with the same warpers, the engine's against naive's own sample of
the same prompt, by a paired z-test over the prompts (`paired_z_test`) at the strict level
``SAMPLING_CHECK_LEVEL``; a token the reference gives probability 0 (outside its top-k or
top-p) fails the check outright. It detects a shifted distribution (a wrong temperature or
truncation, a verification that favours the drafts: samples that are systematically more or
less likely than naive's); it cannot prove equality (other differences can keep the mean
log-probability; with 20 prompts it sees only large shifts; `tests/test_sampling.py` tests
exactness of speculative sampling itself), and with a normal approximation to the
statistic over few prompts a correct engine fails somewhat more often than the level says.

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

import functools
import gc
import hashlib
import json
import math
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

from huggingface.transformers.internals import SUPPORTED, private
from spec_stream import GPTNeoForCausalLM
from spec_stream.checkpoints import load_for_inference
from spec_stream.data import (DATA_DIR_ENV, SPIDER_TABLES_ENV, CustomDataset, default_split, is_preset, load_examples,
                              load_spider_schemas)
from spec_stream.arithmetic import MachineProbe, predicted_bound
from spec_stream.defaults import LOOKUP_BRANCH, REFERENCE_CHECK_PROMPTS, SAMPLING_CHECK_LEVEL
from spec_stream.engines import (ENGINES, Engine, GenerationResult, Sampling, Unsupported, build_engine, load_upstream,
                                 plain_decoding)
from spec_stream.errors import UserError
from spec_stream.metrics import bleu, repetition_rate, rouge_l, spider_database, task_quality


REPORT_SCHEMA_VERSION = 3  # the report's layout, documented field by field in docs/report.md


@dataclass(frozen=True)
class BenchmarkSettings:
    """What a benchmark run measures, checked by `dataset_tps.py`'s parser."""

    engines: tuple[str, ...]  # `naive` first: the fp32 reference
    datasets: tuple[str | CustomDataset, ...]  # presets' names, or one dataset of the user's
    device: torch.device
    num_samples: int
    max_new_tokens: int
    repeats: int
    tree_widths: tuple[int, ...] | str  # "auto": each checkpoint's own best tree for the device
    half_dtype: torch.dtype
    output: Path
    model: str | None = None  # one checkpoint for every dataset; None: the default ones
    checkpoint_dir: Path = Path("checkpoints")
    data_dir: str | None = None
    split: str | None = None  # None: each task's benchmark split
    draft_model: str | None = None
    cuda_graphs: bool = True
    reference_model: str | None = None  # what naive runs; None: the checkpoint itself
    batch_sizes: tuple[int, ...] = (1,)  # ascending; every engine runs at each
    do_sample: bool = False
    temperature: float | None = None  # the sampling settings: None when greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    lookup_branch: int | None = None  # spec_stream's prompt-lookup nodes; None: the task's (LOOKUP_BRANCH)

    def lookup_branch_for(self, task: str) -> int:
        """``lookup_branch`` as given, else the preset's default (your own data: "custom")."""
        if self.lookup_branch is not None:
            return self.lookup_branch
        return LOOKUP_BRANCH.get(task, LOOKUP_BRANCH["custom"])

    @property
    def sampling(self) -> Sampling | None:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed) if self.do_sample else None

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["datasets"] = [d if isinstance(d, str) else asdict(d) for d in self.datasets]
        values["tree_widths"] = self.tree_widths if isinstance(self.tree_widths, str) else ",".join(
            map(str, self.tree_widths))  # "auto" or "4,3,2", as given on the command line
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
    reference: str  # the checkpoint naive runs: --reference-model, else ``checkpoint``
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


@dataclass(frozen=True)
class DefaultRecipe:
    """Where and how a dataset's default checkpoint is prepared (`default_checkpoint`)."""

    dataset: str  # the preset, or your own data's source
    base: Path  # stage 1's output: main stream and streams trained together
    output: Path  # stage 2's: the streams on the frozen base, the checkpoint benchmarked
    pretrained: str | None  # stage 1 starts from this model (None: from scratch)
    custom: dict  # your own data's templates (empty for a preset)
    settings: dict  # DEFAULT_RECIPES' entry for the device


def default_recipe(task: str | CustomDataset, device: torch.device, root: Path) -> DefaultRecipe:
    """The device's recipe for ``task``; your own data gets folders named after it and a
    digest of its source and templates."""
    from spec_stream import defaults

    settings = defaults.DEFAULT_RECIPES["cuda" if device.type == "cuda" else "cpu"]
    custom = asdict(task) if isinstance(task, CustomDataset) else {}
    pretrained = pretrained_base(device)
    size = pretrained.split("/")[-1] if pretrained else settings["size"]
    name = f"{task}-{size}"
    if custom:
        digest = hashlib.sha256(json.dumps(custom, sort_keys=True).encode()).hexdigest()[:8]
        name = f"{task.name}-{digest}-{size}"
        task = custom.pop("source")
    return DefaultRecipe(task, root / f"{name}-base", root / f"{name}-streams", pretrained, custom, settings)


def prepared_checkpoint(task: str | CustomDataset, device: torch.device, root: Path) -> Path | None:
    """The default checkpoint for ``task`` if it is ready, else None."""
    from spec_stream.checkpoints import TRAINING_ARGS

    output = default_recipe(task, device, root).output
    return output if (output / TRAINING_ARGS).is_file() else None


def default_checkpoint(task: str | CustomDataset, device: torch.device, root: Path, data_dir: str | None) -> Path:
    """The fine-tuned checkpoint for ``task`` sized for the device, prepared on first use in
    two resumable stages and reused after: ``<name>-base`` (main stream and streams
    together, from `pretrained_base` or from scratch) and ``<name>-streams`` (the streams
    and their adapters again on the frozen base, learning `defaults.STREAM_TARGETS`)."""
    from spec_stream.finetune import FinetuneConfig, finetune

    if (ready := prepared_checkpoint(task, device, root)) is not None:
        return ready
    recipe = default_recipe(task, device, root)
    key, rows = "custom" if recipe.custom else recipe.dataset, recipe.settings
    origin = f"fine-tuning {recipe.pretrained}" if recipe.pretrained else "from scratch"
    print(f"preparing the default checkpoint for {recipe.dataset} once ({origin}; pass --model to use your own): "
          f"stage 1, the base, in {recipe.base}; stage 2, the streams on the frozen base, in {recipe.output}")
    finetune(FinetuneConfig(dataset=recipe.dataset, output=str(recipe.base), data_dir=data_dir,
                            base=recipe.pretrained, from_scratch=None if recipe.pretrained else rows["size"],
                            epochs=float(rows["epochs"]),
                            max_train_samples=rows["max_train_samples"][key], resume=True, **recipe.custom))
    finetune(FinetuneConfig(dataset=recipe.dataset, output=str(recipe.output), data_dir=data_dir,
                            base=str(recipe.base), freeze_base=True, epochs=float(rows["stream_epochs"]),
                            max_train_samples=rows["stream_train_samples"][key], resume=True, **recipe.custom))
    return recipe.output


@functools.lru_cache(maxsize=None)
def pretrained_base(device: torch.device) -> str | None:
    """`defaults.PRETRAINED_BASE` on a GPU when the hub (or a local copy) serves it, else
    None: a CPU cannot fine-tune 125M parameters in minutes, and offline there is nothing
    to load, so the base is trained from scratch."""
    from spec_stream import defaults
    from spec_stream.checkpoints import load_base_config

    if device.type != "cuda":
        return None
    try:
        load_base_config(defaults.PRETRAINED_BASE)
    except UserError:
        print(f"{defaults.PRETRAINED_BASE} is not reachable (offline?): training the base from scratch")
        return None
    return defaults.PRETRAINED_BASE


def uses_streams(engines: tuple[str, ...]) -> bool:
    """Whether any of ``engines`` drafts with the speculative streams (takes a tree)."""
    return any("tree_widths" in ENGINES[name].settings for name in engines)


def check_tree_depth(tree_widths: tuple[int, ...], num_streams: int, checkpoint: str) -> None:
    """A UserError unless the spec_stream tree has at most one level per stream of the model."""
    if tree_widths != "auto" and len(tree_widths) > num_streams:
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
    it can draft) and the reference model against it, and load the prompts (cut to fit both
    contexts): every failure a UserError, before any engine runs."""
    needs_streams = uses_streams(settings.engines)
    model, tokenizer = load_for_inference(checkpoint, require_streams=needs_streams)
    config = model.config
    del model
    if needs_streams:
        check_tree_depth(settings.tree_widths, config.num_spec_streams, checkpoint)
    context = config.max_position_embeddings
    if settings.reference_model:
        context = min(context, check_reference_model(settings.reference_model, checkpoint, config, tokenizer))
    split = settings.split or default_split(task, "test")
    prompts = load_prompts(task, split, tokenizer, context, settings)
    return TaskInputs(dataset_label(task), split, checkpoint, settings.reference_model or checkpoint, tokenizer,
                      prompts)


def check_reference_model(reference: str, checkpoint: str, config, tokenizer) -> int:
    """A UserError unless ``reference`` loads and reads the same tokens as ``checkpoint``
    (same tokenizer vocabulary and model vocabulary size); its context length."""
    reference_model, reference_tokenizer = load_for_inference(reference)
    reference_config = reference_model.config
    del reference_model
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--reference-model {reference} has another tokenizer than --model {checkpoint}, so their "
                        "outputs cannot be compared; pass the checkpoint --model was fine-tuned from")
    if reference_config.vocab_size != config.vocab_size:
        raise UserError(f"--reference-model {reference} has vocab_size {reference_config.vocab_size} but --model "
                        f"{checkpoint} has {config.vocab_size}; pass the checkpoint --model was fine-tuned from")
    return reference_config.max_position_embeddings


def check_draft_model(draft_model: str) -> None:
    """A UserError now, not after other engines ran, if the draft model cannot be loaded."""
    load_for_inference(draft_model)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB on Linux)


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


def model_key(engine: Engine) -> tuple[str, str, str, str]:
    """What decides an engine's greedy output: checkpoint, model code, attention and weight format."""
    model = engine.model
    owner = "spec-stream" if isinstance(model, GPTNeoForCausalLM) else "upstream"
    return engine.checkpoint, owner, private(model.config, "_attn_implementation"), engine.weight_format


def greedy_reference(engine: Engine, prompts: list[Prompt], max_new_tokens: int, eos_token_id: int | None,
                     known: dict) -> list[list[int]]:
    """Greedy decoding of the engine's own model in its own weight format: what an exact
    engine must reproduce. Computed once per `model_key` and kept in ``known`` (which
    `naive`'s batch-1 outputs seed: they are upstream greedy of the fp32 model)."""
    key = model_key(engine)
    if key not in known:
        known[key] = greedy_outputs(engine.model, prompts, max_new_tokens, eos_token_id)
    return known[key]


def exactness(engine: Engine, outputs: list[list[int]], naive_outputs: list[list[int]], inputs: TaskInputs,
              settings: BenchmarkSettings, known: dict) -> dict:
    """A row's comparisons with batch-1 decoding: its own model's greedy decoding (null
    when sampling: `distribution_check` replaces it) and naive's output (with sampling:
    naive's samples for the same seeds)."""
    if settings.do_sample:
        greedy, described = None, "none: sampling (see distribution_check)"
    else:
        reference = greedy_reference(engine, inputs.prompts, settings.max_new_tokens, inputs.tokenizer.eos_token_id,
                                     known)
        greedy = share_identical(outputs, reference)
        _, owner, attention, weights = model_key(engine)
        described = f"greedy generate of the {owner} model ({attention}, {weights})"
    return {"greedy_reference": described, "identical_to_greedy": greedy,
            "identical_to_naive": share_identical(outputs, naive_outputs), "distribution_check": None}


def check_plain_decoding(inputs: TaskInputs, settings: BenchmarkSettings) -> None:
    """A UserError (exit 2) unless our model's plain greedy `generate` of the checkpoint
    equals upstream GPT-Neo's greedy `generate` of the same weights (same attention) on the
    first `REFERENCE_CHECK_PROMPTS` prompts, both with eager attention (upstream GPT-Neo has
    no other on a CPU). Every exactness figure compares with these
    references: if the installed transformers hands our model what it does not read, the
    run stops here rather than report that exact engines are lossy (or that broken ones
    are exact)."""
    ours, _ = load_for_inference(inputs.checkpoint)
    ours.set_attn_implementation("eager")
    ours = ours.to(settings.device).eval()
    upstream = load_upstream(inputs.checkpoint, "eager")
    prompts, eos = inputs.prompts[:REFERENCE_CHECK_PROMPTS], inputs.tokenizer.eos_token_id
    ours_out = greedy_outputs(ours, prompts, settings.max_new_tokens, eos)
    upstream_out = greedy_outputs(upstream.to(settings.device).eval(), prompts, settings.max_new_tokens, eos)
    for index, (a, b) in enumerate(zip(ours_out, upstream_out)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise UserError(
                f"{inputs.task}: spec-stream's plain greedy decoding of {inputs.checkpoint} differs from upstream "
                f"GPT-Neo's on prompt {index} from new token {at} on, with transformers {transformers.__version__} "
                f"and torch {torch.__version__}: the references this benchmark compares with are broken, so it stops "
                f"before timing. spec-stream is tested with {SUPPORTED}: pip install -r requirements.txt."
            )


def naive_batch1_outputs(engine: Engine, inputs: TaskInputs, settings: BenchmarkSettings) -> list[list[int]]:
    """naive's outputs at batch 1 (untimed): the reference when the sweep skips batch 1."""
    results = engine.run_many([p.ids for p in inputs.prompts], settings.max_new_tokens, inputs.tokenizer.eos_token_id)
    return [r.new_tokens for r in results]


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


@torch.no_grad()
def mean_log_probs(model, prompts: list[Prompt], outputs: list[list[int]], warpers) -> tuple[list[float], int]:
    """Per prompt, the mean over its new tokens of log p(token | text before it) under
    ``model`` with ``warpers`` applied to its logits (what sampling draws from), and the
    number of tokens to which that gives probability 0 (left out of the means)."""
    means, outside = [], 0
    for prompt, tokens in zip(prompts, outputs):
        ids = torch.cat([prompt.ids, torch.tensor([tokens])], dim=1).to(model.device)
        logits = model(ids).logits[0, prompt.ids.shape[1] - 1:-1].float()
        scores = warpers(ids[:, :1].expand(len(tokens), 1), logits)  # the warpers read only the scores
        log_probs = scores.log_softmax(dim=-1).gather(1, ids[0, prompt.ids.shape[1]:, None])[:, 0]
        finite = torch.isfinite(log_probs)
        outside += int((~finite).sum())
        means.append(float(log_probs[finite].mean()) if bool(finite.any()) else -math.inf)
    return means, outside


def paired_z_test(means: list[float], reference_means: list[float], outside: int, level: float) -> dict | None:
    """The distribution check of one row (see the module docstring): differences of the
    per-prompt means against the reference's, z = mean / (sd / sqrt(n)), two-sided p by
    the normal approximation; None with fewer than 2 prompts."""
    differences = [a - b for a, b in zip(means, reference_means) if math.isfinite(a - b)]
    if len(differences) < 2:
        return None
    spread = max(float(np.std(differences, ddof=1)), 1e-12)
    statistic = float(np.mean(differences)) / (spread / math.sqrt(len(differences)))
    p_value = math.erfc(abs(statistic) / math.sqrt(2))
    return {"test": "paired z-test over prompts of the mean log-probability per token under the reference model",
            "mean_log_prob": float(np.mean([m for m in means if math.isfinite(m)])),
            "reference_mean_log_prob": float(np.mean(reference_means)), "statistic": statistic, "p_value": p_value,
            "level": level, "tokens_outside_support": outside, "passed": outside == 0 and p_value >= level}


def check_distributions(rows: list[dict], outputs: list[list[list[int]]], naive_outputs: list[list[int]],
                        inputs: TaskInputs, settings: BenchmarkSettings) -> None:
    """Fill each row's ``distribution_check`` against naive's batch-1 samples, scored by
    the reference model (fp32, upstream, as naive ran it) with the run's warpers."""
    model = load_upstream(inputs.reference, "eager").to(settings.device).eval()
    warpers = settings.sampling.warpers()
    reference_means, _ = mean_log_probs(model, inputs.prompts, naive_outputs, warpers)
    for row, tokens in zip(rows, outputs):
        means, outside = mean_log_probs(model, inputs.prompts, tokens, warpers)
        row["distribution_check"] = paired_z_test(means, reference_means, outside, SAMPLING_CHECK_LEVEL)
