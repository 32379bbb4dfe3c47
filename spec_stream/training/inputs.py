"""Everything a fine-tuning run reads before its first step, each part checked up front:
the output folder, the checkpoint to resume (or the finished run's summary), the model's
shape against the settings, and the data; then the output folder made ready."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spec_stream.checkpoints import (MODEL_SIZES, TRAINING_ARGS, check_base, check_output_path, is_run_folder,
                                     latest_checkpoint, load_checkpoint, read_json, remove_stale_temporaries,
                                     stream_layers, visible_entries)
from spec_stream.data import CustomDataset, Example, dataset_name, default_split, load_examples
from spec_stream.errors import UserError
from spec_stream.training.config import RESUME_SETTINGS, FinetuneConfig, dataset_of


@dataclass
class Checkpoint:
    """A loaded checkpoint folder."""

    folder: Path
    state: dict  # weights, optimizer, scheduler, RNG, step, losses, settings
    model_config: Any
    tokenizer: Any


@dataclass
class Inputs:
    """Everything read before the first step, each part already checked."""

    output: Path
    train: list[Example]
    evaluation: list[Example]
    train_split: str
    resume: Checkpoint | None  # the newest checkpoint, with --resume
    summary: dict | None  # the saved summary when OUTPUT already holds the finished run


def check_output(config: FinetuneConfig) -> Path:
    """OUTPUT must be a folder we may write into: new, empty, or an earlier run's (with
    --resume or --overwrite), or any folder with --overwrite."""
    output = Path(config.output)
    check_output_path(output)
    if is_run_folder(output):
        if not (config.resume or config.overwrite):
            raise UserError(f"--output {output} already holds a fine-tuning run; pass --resume to continue it, "
                            "--overwrite to train again over it, or choose another --output")
    elif visible_entries(output) and not config.overwrite:
        entries = visible_entries(output)
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"--output {output} already holds other files ({shown}); choose a new or empty folder, "
                        "or pass --overwrite to add the model beside them (files named like its files are replaced)")
    return output


def check_resumable(saved: dict, config: FinetuneConfig, source: Path) -> None:
    """A UserError naming every training setting that differs from the run saved in ``source``."""
    current = dataclasses.asdict(config)
    differ = [name for name in RESUME_SETTINGS if saved.get(name) != current[name]]
    if differ:
        flags = ", ".join(f"--{n.replace('_', '-')} {current[n]} (saved: {saved.get(n)})" for n in differ)
        raise UserError(f"--resume: this run differs from the one saved in {source}: {flags}; rerun with the saved "
                        "values, or drop --resume and pass --overwrite (or another --output) to start a new run")


def load_resume_state(config: FinetuneConfig, output: Path):
    """(checkpoint, finished summary) for --resume, each checked against this run's settings."""
    fix = "delete it or drop --resume (with --overwrite) to start again"
    if (output / TRAINING_ARGS).is_file():
        saved = read_json(output / TRAINING_ARGS, fix)
        check_resumable(saved.get("args", {}), config, output / TRAINING_ARGS)
        return None, saved.get("summary")
    folder = latest_checkpoint(output)
    if folder is None:
        return None, None
    fix = f"delete {folder} to resume from an earlier checkpoint, or drop --resume (with --overwrite) to start again"
    checkpoint = Checkpoint(folder, *load_checkpoint(folder, fix))
    check_resumable(checkpoint.state["settings"], config, folder)
    return checkpoint, None


def check_model_fits(config: FinetuneConfig, resume: Checkpoint | None, task: str) -> None:
    """--num-stream-layers, the adapter ranks and --max-length against the model's layers,
    width and positions."""
    if resume:
        model_config = resume.model_config
    else:
        model_config = check_base(config.base, config.num_spec_streams) if config.base else None
    shape = model_config.to_dict() if model_config else MODEL_SIZES[config.from_scratch]
    if not resume:  # a checkpoint brings its own stream layers
        stream_layers(config.num_stream_layers, task, shape["num_layers"])
    for flag, rank in (("--lora-rank", config.lora_rank), ("--stream-adapter-rank", config.stream_adapter_rank or 0)):
        if rank > shape["hidden_size"]:
            raise UserError(f"{flag} {rank} exceeds the model's hidden size {shape['hidden_size']}, the most a "
                            f"low-rank adapter can use; pass {shape['hidden_size']} or less")
    positions = shape["max_position_embeddings"]
    if config.max_length > positions:
        raise UserError(f"--max-length {config.max_length} exceeds the model's {positions} positions; "
                        f"pass --max-length {positions} or less")


def load_inputs(config: FinetuneConfig) -> Inputs:
    """Read and check every input (output folder, checkpoint, model shape, data) before any work."""
    output = check_output(config)
    resume, summary = load_resume_state(config, output) if config.resume else (None, None)
    dataset = dataset_of(config)
    train_split = config.train_split or default_split(dataset, "train")
    if summary is not None:
        return Inputs(output, [], [], train_split, None, summary)
    check_model_fits(config, resume, dataset_name(dataset))
    train = load_examples(dataset, train_split, config.data_dir, config.max_train_samples)
    evaluation = load_examples(dataset, config.eval_split, config.data_dir, config.max_eval_samples)
    for examples, split, flag in ((train, train_split, "train"), (evaluation, config.eval_split, "eval")):
        if not examples:
            where = "the file" if isinstance(dataset, CustomDataset) else "its file in --data-dir"
            raise UserError(f"{dataset_name(dataset)}/{split} has no examples; check {where}, "
                            f"or pick another --{flag}-split")
    return Inputs(output, train, evaluation, train_split, resume, None)


def prepare_output(inputs: Inputs) -> None:
    """Prepare OUTPUT once every input has passed: stale temporaries go, and a run that
    starts over (--overwrite) first drops the old run's finished marker."""
    inputs.output.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(inputs.output)
    if inputs.resume is None:
        (inputs.output / TRAINING_ARGS).unlink(missing_ok=True)
