"""One task's inputs, every one checked before the first engine runs: the checkpoint (and
its tree, when an engine drafts with the streams), the reference model and the draft
model against it, and the prompts (cut to fit the context; Spider's with an empty
database of their schema, to judge SQL validity)."""
from __future__ import annotations

import json
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from huggingface.transformers.generation.speculative_tree import AUTO, TreeSpec
from spec_stream.benchmark.settings import BenchmarkSettings
from spec_stream.checkpoints import load_for_inference
from spec_stream.data import (DATA_DIR_ENV, SPIDER_TABLES_ENV, CustomDataset, default_split, load_examples,
                              load_spider_schemas)
from spec_stream.engines import ENGINES
from spec_stream.errors import UserError
from spec_stream.metrics import spider_database


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


def uses_streams(engines: tuple[str, ...]) -> bool:
    """Whether any of ``engines`` drafts with the speculative streams (takes a tree)."""
    return any("tree_widths" in ENGINES[name].settings for name in engines)


def check_tree_depth(tree: TreeSpec | str, num_streams: int, checkpoint: str) -> None:
    """A UserError unless the spec_stream tree has at most one level per stream of the model."""
    if tree == AUTO:
        return
    try:
        tree.check_streams(num_streams, checkpoint)
    except ValueError as error:
        raise UserError(f"--tree-widths: {error}") from None


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


def load_prompts(task: str | CustomDataset, split: str, tokenizer, context: int,
                 settings: BenchmarkSettings) -> list[Prompt]:
    """Benchmark prompts; a prompt longer than ``context - max_new_tokens`` keeps its end."""
    room = check_room(settings.max_new_tokens, context)
    examples = load_examples(task, split, data_dir=settings.data_dir, limit=settings.num_samples)
    if not examples:
        raise UserError(f"{dataset_label(task)}/{split} gave no examples; check --data-dir and --split")
    texts = [example.prompt for example in examples]
    databases = spider_databases(texts, settings.data_dir) if task == "spider" else [None] * len(examples)
    prompts = []
    lengths = []
    for example, database in zip(examples, databases):
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids
        lengths.append(ids.shape[1])
        prompts.append(Prompt(ids[:, -room:], example.references, ids.shape[1] > room, database))
    warn_truncated(lengths, room, f"{dataset_label(task)}/{split}", settings.max_new_tokens)
    return prompts


def warn_truncated(lengths: list[int], room: int, label: str, max_new_tokens: int) -> None:
    """A warning on stderr, before any timing, when prompts were cut to ``room`` tokens."""
    cut = [length for length in lengths if length > room]
    if cut:
        print(f"warning: {len(cut)} of {len(lengths)} {label} prompts are longer than the {room} tokens the context "
              f"leaves beside --max-new-tokens {max_new_tokens} (the longest has {max(cut)}); they keep only their "
              "last tokens, and the table's 'cut' column counts them", file=sys.stderr)


def check_room(max_new_tokens: int, context: int) -> int:
    """The tokens a prompt may keep in a ``context`` beside ``max_new_tokens`` new ones: a
    UserError when none are left."""
    if context - max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                        f"{context} tokens; pass at most {context - 1}")
    return context - max_new_tokens


def dataset_label(task: str | CustomDataset) -> str:
    """The report's "dataset": a preset's name, or your own data's file or hub id as given."""
    return task.source if isinstance(task, CustomDataset) else task


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
