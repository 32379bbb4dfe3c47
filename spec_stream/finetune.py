"""Fine-tune the speculative streams (docs/method.md) with `accelerate`.

    python -m spec_stream.finetune --dataset e2e_nlg --output runs/e2e --from-scratch tiny --data-dir DIR
    python -m spec_stream.finetune --dataset mine.jsonl --prompt-template 'Q: {question}\\nA:' \\
        --response-field answer --output runs/mine
    accelerate launch -m spec_stream.finetune --dataset spider --output runs/sql --base EleutherAI/gpt-neo-125m
    accelerate launch --multi_gpu --num_processes 2 -m spec_stream.finetune ...  # 2 processes on a CPU (gloo)

`--dataset` is a preset or your own data (a file or hub id with templates: see
`spec_stream.data`). Processes share each global batch (``--batch-size`` rows each) and
weight their losses by their share of its target tokens, so N processes follow the same
loss curve as one process with N times the batch; only the main process writes. Without a
GPU, `accelerate launch` needs ``--multi_gpu`` to start several processes (they then run on
the CPU); a launch that started one process where several were asked is refused.

Loss ``a0 * CE(main) + a_j * sum_j CE(stream_j)`` on target tokens only. Modes: full
fine-tuning (default), LoRA (`--lora-rank R`, merged before the final save) and
`--freeze-base` (only `transformer.streams.*` trains: the main stream stays the base model
bit for bit). `--train-pruner` adds ``PRUNER_LOSS_WEIGHT * CE(early-exit logits, next token)``,
trained jointly. A checkpoint (`OUTPUT/checkpoint-<step>`) is published every `--save-every` steps,
at the end of each epoch and on SIGTERM or Ctrl-C (exit 143 / 130); `--resume` continues
from the newest one exactly (same batch order, optimizer and scheduler state), whatever
moment the previous run was killed at. The final model, tokenizer and `training_args.json`
go to OUTPUT beside anything else there (a folder holding other files, or an earlier run
without `--resume`, needs `--overwrite`), loadable by `from_pretrained` and `dataset_tps.py`.

From Python: ``finetune(FinetuneConfig(dataset="e2e_nlg", output="runs/e2e"))``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from spec_stream import GPTNeoForCausalLM, defaults
from huggingface.transformers.generation.tree_search import (greedy_texts, measure_acceptance,
                                                              measure_lookup_acceptance)
from spec_stream.arithmetic import ModelShape, forward_flops, measure_machine
from spec_stream.checkpoints import (MODEL_SIZES, STATE_FILE, TRAINING_ARGS, build_from_scratch, check_output_path,
                                     is_run_folder, latest_checkpoint, load_base, load_base_config,
                                     load_checkpoint, publish_model, read_json, remove_stale_temporaries,
                                     save_checkpoint, stream_layers, streams_by_default, visible_entries)
from spec_stream.data import (CustomDataset, Example, dataset_name, default_split, load_examples, resolve_dataset,
                              tokenize_example)
from spec_stream.errors import UserError, exit_on_user_error


@dataclass(frozen=True)
class FinetuneConfig:
    """Every setting of a fine-tuning run. Each field is the command-line flag of the same
    name (``--max-train-samples`` is ``max_train_samples``); None means "see the flag's help"."""

    dataset: str
    output: str
    data_dir: str | None = None
    prompt_template: str | None = None
    response_field: str | None = None
    response_template: str | None = None
    from_scratch: str | None = None
    base: str | None = None
    train_split: str | None = None
    eval_split: str = defaults.EVAL_SPLIT
    epochs: float = defaults.EPOCHS
    max_train_samples: int | None = None
    max_eval_samples: int | None = defaults.MAX_EVAL_SAMPLES
    max_steps: int | None = None
    batch_size: int = defaults.BATCH_SIZE
    max_length: int = defaults.MAX_LENGTH
    lr: float | None = None
    warmup_ratio: float = defaults.WARMUP_RATIO
    seed: int = defaults.SEED
    num_spec_streams: int = defaults.NUM_SPEC_STREAMS
    num_stream_layers: int | None = None
    main_loss_weight: float = defaults.MAIN_LOSS_WEIGHT
    stream_loss_weight: float = defaults.STREAM_LOSS_WEIGHT
    lora_rank: int = defaults.LORA_RANK
    freeze_base: bool = False
    stream_adapter_rank: int | None = None
    stream_targets: str | None = None
    train_pruner: bool = False
    save_every: int = defaults.SAVE_EVERY
    resume: bool = False
    overwrite: bool = False
    mixed_precision: str = defaults.MIXED_PRECISION
    peak_tflops: float = defaults.GPU_PEAK_TFLOPS


# Settings that shape the training trajectory: `--resume` refuses a run that changes one.
RESUME_SETTINGS = ("dataset", "prompt_template", "response_field", "response_template", "train_split",
                   "max_train_samples", "epochs", "batch_size", "max_length", "lr", "warmup_ratio", "seed",
                   "num_spec_streams", "num_stream_layers", "main_loss_weight", "stream_loss_weight", "lora_rank",
                   "freeze_base", "stream_adapter_rank", "stream_targets", "train_pruner")
PRECISIONS = ("auto", "no", "bf16", "fp16")
STREAM_TARGETS = ("references", "distill", "greedy")  # what the streams learn to predict (--stream-targets)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option that has a default of its own."""

    def _get_help_string(self, action):
        return action.help if action.required or action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line of :class:`FinetuneConfig`: one flag per field, defaults taken from it."""
    parser = argparse.ArgumentParser(prog="python -m spec_stream.finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpWithDefaults)
    fields = {field.name: field.default for field in dataclasses.fields(FinetuneConfig)}

    def add(name: str, help: str, **kwargs):
        default = fields[name]
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument("--" + name.replace("_", "-"), help=help, **kwargs)

    add("dataset", "a preset (spider, dialogsum, e2e_nlg), or your own data: a .jsonl, .json, .csv or .parquet "
        "file, a folder of them, or a hub dataset id (with --prompt-template and --response-field)",
        metavar="PRESET_FILE_OR_HUB_ID")
    add("output", "folder for the final model and its checkpoint-<step>/ (other files in it are kept)")
    add("data_dir", "local JSON-lines copies of the presets (default: $SPEC_STREAM_DATA_DIR, then the hub)")
    add("prompt_template", "your own data: a row's prompt, str.format over its columns, e.g. "
        "'Question: {question}\\nAnswer:' (default: none; presets have their own)", metavar="TEMPLATE")
    add("response_field", "your own data: the column holding the target text (default: none)", metavar="COLUMN")
    add("response_template", "your own data: the target as a template instead, e.g. '{answer} ({unit})' "
        "(default: none)", metavar="TEMPLATE")
    add("from_scratch", f"train a new model of this size: {', '.join(MODEL_SIZES)} "
        f"(default: {defaults.FROM_SCRATCH_SIZE} unless --base is given)", metavar="SIZE")
    add("base", "a GPT-Neo checkpoint (folder or hub id) to fine-tune (default: none, a model from scratch)",
        metavar="PATH_OR_HUB_ID")
    add("train_split", "split to train on (default: train; a single file is split 80/10/10 into train, "
        "validation and test by a fixed-seed hold-out)")
    add("eval_split", "split for the final validation pass")
    add("epochs", "passes over the training set", type=float)
    add("max_train_samples", "train on the first N examples (default: all)", type=int)
    add("max_eval_samples", "validate on the first N examples", type=int)
    add("max_steps", "stop after this many steps, checkpoint kept, continue with --resume (default: all)", type=int)
    add("batch_size", "examples per step and process", type=int)
    add("max_length", "tokens per example (prompt cut from its start)", type=int)
    from_scratch_rates = ", ".join(f"{rate} for {size}" for size, rate in defaults.LEARNING_RATE_FROM_SCRATCH.items())
    add("lr", f"peak learning rate (default: {defaults.LEARNING_RATE}, paper; from scratch: {from_scratch_rates}; "
        f"--freeze-base: {defaults.LEARNING_RATE_FROZEN_BASE})", type=float)
    add("warmup_ratio", "share of the steps spent warming the learning rate up", type=float)
    add("seed", "initialisation and batch-order seed", type=int)
    add("num_spec_streams", "speculative streams (gamma)", type=int)
    add("num_stream_layers", "top layers the streams run in (default: the paper's share of the layers)", type=int)
    add("main_loss_weight", "a0, weight of the main stream's loss", type=float)
    add("stream_loss_weight", "a_j, weight of each stream's loss", type=float)
    add("lora_rank", "LoRA rank, 0 = full fine-tuning", type=int)
    add("freeze_base", "train only the stream parameters of the --base model")
    add("stream_adapter_rank", "rank of the streams' own adapters in the stream layers (default: "
        f"{defaults.STREAM_ADAPTER_RANK} with --freeze-base, where the streams need capacity of their own; 0 otherwise)",
        type=int)
    add("stream_targets", "what the streams learn: references (the data's next tokens), distill (the frozen "
        "base's own distribution at each later position, same forward) or greedy (references replaced by the base's "
        "greedy continuations, generated first); distill and greedy need --freeze-base (default: "
        f"{defaults.STREAM_TARGETS} with --freeze-base, references otherwise)", choices=STREAM_TARGETS)
    add("train_pruner", "also train the tree-pruning adapter")
    add("save_every", "steps between checkpoints (plus one at every epoch end)", type=int)
    add("resume", "continue from OUTPUT's newest checkpoint (start afresh if it has none)")
    add("overwrite", "write into an OUTPUT that holds other files or an earlier run (its model files are replaced)")
    add("mixed_precision", "auto = bf16 on a GPU that supports it, else no", choices=PRECISIONS)
    add("peak_tflops", "device peak for MFU (H100 bf16 dense)", type=float)
    return parser


def parse_config(argv=None) -> FinetuneConfig:
    return FinetuneConfig(**vars(build_parser().parse_args(argv)))


def dataset_of(config: FinetuneConfig) -> str | CustomDataset:
    """The preset or custom dataset that --dataset and the template flags name."""
    return resolve_dataset(config.dataset, config.prompt_template, config.response_field, config.response_template)


def check_config(config: FinetuneConfig) -> FinetuneConfig:
    """The settings on their own (no file is read): a UserError for a bad one, else the
    config with the preset's name, model size and learning rate filled in."""
    dataset = dataset_of(config)
    if config.from_scratch and config.base:
        raise UserError("--from-scratch and --base exclude each other; pick one")
    if config.freeze_base and not config.base:
        raise UserError("--freeze-base trains only the streams on top of a trained model, so it needs --base "
                        "PATH_OR_HUB_ID (a model from scratch has a random base); add --base or drop --freeze-base")
    size = config.from_scratch or (None if config.base else defaults.FROM_SCRATCH_SIZE)
    if size and size not in MODEL_SIZES:
        raise UserError(f"unknown --from-scratch size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    lr = config.lr if config.lr is not None else default_learning_rate(size, config.freeze_base)
    config = dataclasses.replace(config, dataset=dataset if isinstance(dataset, str) else config.dataset,
                                 from_scratch=size, lr=lr)
    for name in ("epochs", "batch_size", "max_length", "save_every", "lr", "peak_tflops"):
        if getattr(config, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    for name, meaning in (("max_train_samples", "train on all"), ("max_eval_samples", "validate on all"),
                          ("max_steps", "train for --epochs")):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}; "
                            f"pass a positive number, or leave it out to {meaning}")
    if config.num_spec_streams < 0:
        raise UserError(f"--num-spec-streams must be 0 (a plain model, e.g. the base of a later stream stage) or "
                        f"more, got {config.num_spec_streams}")
    if config.freeze_base and not config.num_spec_streams:
        raise UserError("--freeze-base trains only the streams, so it needs --num-spec-streams 1 or more")
    if config.stream_targets is None:
        config = dataclasses.replace(config, stream_targets=defaults.STREAM_TARGETS if config.freeze_base
                                     else "references")
    if config.stream_targets not in STREAM_TARGETS:
        raise UserError(f"unknown --stream-targets {config.stream_targets!r}; choose one of {', '.join(STREAM_TARGETS)}")
    if config.stream_targets != "references" and not config.freeze_base:
        raise UserError(f"--stream-targets {config.stream_targets} teaches the streams the base model's own "
                        "predictions, which only hold still with --freeze-base; add --freeze-base --base PATH, "
                        "or use --stream-targets references")
    if config.num_stream_layers is not None and config.num_stream_layers < 1:
        raise UserError(f"--num-stream-layers must be at least 1, got {config.num_stream_layers}")
    if config.stream_adapter_rank is not None and config.stream_adapter_rank < 0:
        raise UserError(f"--stream-adapter-rank must be 0 (none) or more, got {config.stream_adapter_rank}")
    if not 0 <= config.warmup_ratio < 1:
        raise UserError(f"--warmup-ratio must lie in [0, 1), got {config.warmup_ratio}")
    if config.main_loss_weight < 0 or config.stream_loss_weight < 0 or config.lora_rank < 0:
        raise UserError("--main-loss-weight, --stream-loss-weight and --lora-rank must not be negative")
    if config.freeze_base and config.lora_rank:
        raise UserError("--freeze-base and --lora-rank exclude each other: freeze-base trains only the streams")
    if config.mixed_precision not in PRECISIONS:
        raise UserError(f"unknown --mixed-precision {config.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}")
    return config


# ------------------------------------------------------------- inputs, checked up front


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


def default_learning_rate(size: str | None, freeze_base: bool) -> float:
    """The peak rate when --lr is not given: from scratch, the size's; with the base frozen,
    the stream adapters' (they start at zero); else the paper's fine-tuning rate."""
    if freeze_base:
        return defaults.LEARNING_RATE_FROZEN_BASE
    return defaults.LEARNING_RATE_FROM_SCRATCH.get(size, defaults.LEARNING_RATE)


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
    """--num-stream-layers and --max-length against the model's layers and positions."""
    model_config = resume.model_config if resume else load_base_config(config.base) if config.base else None
    shape = model_config.to_dict() if model_config else MODEL_SIZES[config.from_scratch]
    if not resume:  # a checkpoint brings its own stream layers
        stream_layers(config.num_stream_layers, task, shape["num_layers"])
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


# ------------------------------------------------------------------------ the model


def select_trainable(model, config: FinetuneConfig):
    """What trains: everything, the streams only (--freeze-base) or LoRA and the streams; the
    pruning adapter only with --train-pruner (an unused trainable parameter stops DDP)."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad = config.train_pruner or ".pruner_" not in name
    if config.freeze_base:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "transformer.streams." in name and parameter.requires_grad
        return model
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                                 target_modules=list(defaults.LORA_TARGETS), lora_dropout=0.0))
        for name, parameter in model.named_parameters():
            if "transformer.streams." in name:
                parameter.requires_grad = config.train_pruner or ".pruner_" not in name
    return model


@dataclass
class Run:
    """A fine-tuning run in progress: what the training loop, the checkpoints and the
    final evaluation share."""

    config: FinetuneConfig
    inputs: Inputs
    accelerator: Accelerator
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    features: list[dict]
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    first_loss: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    saved_step: int | None = None
    tokens: int = 0  # non-padding tokens trained on (all processes)
    flops: float = 0.0  # matmul FLOPs of those steps (`batch_flops`)
    peak_flops: float = 1.0  # the device's: a measured fp32 matmul rate on a CPU, --peak-tflops on a GPU
    shape: ModelShape | None = None

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes


def adapter_rank_of(config: FinetuneConfig) -> int:
    """--stream-adapter-rank, or its default: adapters with --freeze-base, none otherwise."""
    if config.stream_adapter_rank is not None:
        return config.stream_adapter_rank
    return defaults.STREAM_ADAPTER_RANK if config.freeze_base else 0


def build_run(config: FinetuneConfig, inputs: Inputs, accelerator: Accelerator) -> Run:
    """Model, tokenizer, optimizer and schedule, restored from the checkpoint with --resume."""
    task = dataset_name(dataset_of(config))
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    state = inputs.resume.state if inputs.resume else None
    if state:  # shapes and tokenizer were saved with the checkpoint, weights in its state file
        model, tokenizer = GPTNeoForCausalLM(inputs.resume.model_config), inputs.resume.tokenizer
    elif config.from_scratch:
        model, tokenizer = build_from_scratch(config.from_scratch, [e.prompt + e.target for e in inputs.train],
                                              config.num_spec_streams, config.num_stream_layers, task)
    else:
        model, tokenizer = load_base(config.base, config.num_spec_streams, config.num_stream_layers, task)
    adapter_rank = adapter_rank_of(config)
    if not state and adapter_rank and model.config.stream_adapter_rank != adapter_rank:
        model.add_stream_adapters(adapter_rank)
    model.config.main_loss_weight, model.config.stream_loss_weight = config.main_loss_weight, config.stream_loss_weight
    model = select_trainable(model, config)
    if state:
        model.load_state_dict(state["model"])
    features = [tokenize_example(tokenizer, e, config.max_length) for e in inputs.train]
    if config.stream_targets == "greedy":
        features = greedy_features(model, tokenizer, features, accelerator.device)
    steps_per_epoch = math.ceil(len(features) / (config.batch_size * accelerator.num_processes))  # global batches
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run = Run(config, inputs, accelerator, model, tokenizer, optimizer, scheduler, features, steps_per_epoch,
              total_steps, peak_flops=peak_flops(accelerator.device, config),
              shape=ModelShape.of(accelerator.unwrap_model(model).config))
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        run.step, run.first_loss, run.losses = state["step"], state["first_loss"], list(state["losses"])
        run.saved_step = run.step
        accelerator.print(f"resuming from {inputs.resume.folder} at step {run.step}/{total_steps}")
    return run


@torch.no_grad()
def greedy_features(model, tokenizer, features: list[dict], device) -> list[dict]:
    """``features`` with each target replaced by the model's own greedy continuation of its
    prompt, as long as the reference target at most (up to its end-of-sequence token, kept
    as a target): what the streams will see when decoding. Deterministic, so a resumed run
    makes the same texts again."""
    model.eval()
    model.to(device)
    eos, pad, batch = tokenizer.eos_token_id, tokenizer.pad_token_id, defaults.GREEDY_TARGETS_BATCH
    rebuilt = []
    for start in tqdm(range(0, len(features), batch), desc="greedy targets", unit="batch"):
        chunk = features[start:start + batch]
        prompts = [[t for t, label in zip(f["input_ids"], f["labels"]) if label == -100] for f in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        longest = max(len(f["labels"]) - len(p) for f, p in zip(chunk, prompts))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, speculative_streaming=True,
                             tree_widths=(), pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for f, prompt, new in zip(chunk, prompts, out):
            target = new[: len(f["labels"]) - len(prompt)]
            target = target[: target.index(eos) + 1] if eos in target else target
            rebuilt.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    model.train()
    return rebuilt


def peak_flops(device: torch.device, config: FinetuneConfig) -> float:
    """The denominator of MFU: on a GPU the datasheet peak (--peak-tflops); on a CPU the
    fp32 matmul rate measured now (a short probe: no datasheet knows a shared machine)."""
    if device.type == "cuda":
        return config.peak_tflops * 1e12
    return cpu_matmul_rate()


@functools.lru_cache(maxsize=1)
def cpu_matmul_rate() -> float:
    """fp32 matmul FLOP/s of this process's threads, measured once (about half a second),
    leaving the random state as it was (a resumed run must draw what the first one drew)."""
    with torch.random.fork_rng(devices=[]):
        return measure_machine("cpu", repeats=3, buffer_bytes=2**22).matmul_flops_per_second


# ---------------------------------------------------------------------- training


def make_batches(features, order, batch_size, pad_id):
    """Left-padded batches (labels -100 on padding, positions counted from each row's first
    token) in the given example order: every row's targets end at the last column, so the
    positions that carry some row's target (where the head and the streams run) are few."""
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        width = max(len(f["input_ids"]) for f in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, f in enumerate(chunk):
            n = len(f["input_ids"])
            ids[row, width - n:], labels[row, width - n:] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            mask[row, width - n:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def compute_loss(model, batch, train_pruner, distill_streams=False):
    """The training loss (streams only where they have targets, the head only on target rows:
    `GPTNeoForCausalLM._loss_on_targets`), plus the pruner's early-exit loss when trained."""
    out = model(**batch, early_exit=train_pruner, loss_only=True, distill_streams=distill_streams)
    if train_pruner:
        return out.loss + defaults.PRUNER_LOSS_WEIGHT * out.early_exit_loss
    return out.loss


def length_bucketed(order: list[int], lengths: list[int], global_batch: int, generator) -> list[list[int]]:
    """Global batches of similar lengths (little padding): windows of ``BUCKET_WINDOW`` global
    batches of the shuffled ``order`` are sorted by length and cut into batches, and the
    batches are shuffled again. Deterministic for the generator's seed."""
    span = global_batch * defaults.BUCKET_WINDOW
    batches = []
    for start in range(0, len(order), span):
        window = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [window[b:b + global_batch] for b in range(0, len(window), global_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def epoch_batches(run: Run, epoch: int) -> list[dict]:
    """This process's batches of ``epoch``: a seeded shuffle, length-bucketed global
    batches, each split across processes."""
    accelerator = run.accelerator
    generator = torch.Generator().manual_seed(run.config.seed + epoch)
    order = torch.randperm(len(run.features), generator=generator).tolist()
    lengths = [len(f["input_ids"]) for f in run.features]
    batches = length_bucketed(order, lengths, run.global_batch, generator)
    mine = [batch[accelerator.process_index::accelerator.num_processes] for batch in batches]
    return [next(make_batches(run.features, rows, len(rows), run.tokenizer.pad_token_id)) if rows else
            idle_batch(run, batch) for rows, batch in zip(mine, batches)]


def idle_batch(run: Run, global_rows: list[int]) -> dict:
    """The batch of a process whose share of a short last global batch is empty: one row
    without targets (loss 0, zero gradients), so that every process takes every step."""
    batch = next(make_batches(run.features, global_rows[:1], 1, run.tokenizer.pad_token_id))
    batch["labels"].fill_(-100)
    return batch


def target_share(accelerator: Accelerator, labels: torch.Tensor):
    """The factor that makes this process's mean loss its part of the global batch's mean:
    its share of the batch's target tokens times the process count (DDP averages the
    processes' gradients). So the loss curve and the updates do not depend on how a global
    batch is split (exactly when every prompt has more tokens than there are streams, so
    each stream's targets are the main stream's). 1 on one process."""
    if accelerator.num_processes == 1:
        return 1.0
    local = (labels[:, 1:] != -100).sum()
    total = accelerator.reduce(local.clone(), reduction="sum")
    return local * accelerator.num_processes / total.clamp(min=1)


def batch_flops(shape: ModelShape, batch: dict, frozen_base: bool = False) -> float:
    """Matmul FLOPs of one training step on ``batch``, counting the rows the model really
    runs: every token through every layer, stream rows at the target positions through the
    top layers, the head on target rows. Backward costs twice the forward of what it goes
    through: everything, or with ``frozen_base`` the stream layers and the stream heads."""
    total = 0.0
    top = dataclasses.replace(shape, layers=shape.stream_layers)
    for tokens, targets in zip(batch["attention_mask"].sum(dim=1).tolist(),
                               (batch["labels"] != -100).sum(dim=1).tolist()):
        stream_rows = shape.streams * (targets + shape.streams)
        forward = forward_flops(shape, tokens, 0, logits_rows=targets + stream_rows, stream_rows=stream_rows)
        backward = forward_flops(top, tokens, 0, logits_rows=stream_rows, stream_rows=stream_rows) \
            if frozen_base else forward
        total += forward + 2 * backward
    return total


def train_step(run: Run, batch: dict) -> float:
    """One optimizer step; returns the loss averaged over processes."""
    accelerator = run.accelerator
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    loss = compute_loss(run.model, batch, run.config.train_pruner, run.config.stream_targets == "distill")
    loss = loss * target_share(accelerator, batch["labels"])
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(run.model.parameters(), defaults.GRAD_CLIP_NORM)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    run.step += 1
    run.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
    run.flops += batch_flops(run.shape, batch, run.config.freeze_base) * accelerator.num_processes
    value = accelerator.gather(loss.detach()[None]).mean().item()
    run.first_loss = value if run.first_loss is None else run.first_loss
    run.losses.append(value)
    return value


def train(run: Run, stop: int, signals: StopSignals) -> None:
    """Steps up to ``stop``, a checkpoint every --save-every steps, at each epoch end, at
    ``stop``, and before leaving on SIGTERM / SIGINT."""
    run.model.train()
    progress = tqdm(total=run.total_steps, initial=run.step, desc=f"fine-tuning {run.config.dataset}",
                    disable=not run.accelerator.is_local_main_process)
    started, tokens, flops = time.perf_counter(), run.tokens, run.flops
    while run.step < stop:
        epoch, offset = divmod(run.step, run.steps_per_epoch)
        for batch in epoch_batches(run, epoch)[offset:]:
            value = train_step(run, batch)
            seconds = time.perf_counter() - started
            progress.update(1)
            progress.set_postfix(loss=f"{value:.3f}", tok_s=f"{(run.tokens - tokens) / seconds:.0f}",
                                 mfu=f"{(run.flops - flops) / seconds / run.peak_flops:.1%}")
            step = run.step
            if step % run.config.save_every == 0 or step == stop or step % run.steps_per_epoch == 0:
                save_state(run)
            signals.check(run)
            if step >= stop:
                break
    progress.close()


def resume_settings(config: FinetuneConfig) -> dict:
    return {name: getattr(config, name) for name in RESUME_SETTINGS}


def save_state(run: Run) -> None:
    """Publish ``checkpoint-<step>``: everything `--resume` needs, as tensors and primitives
    (loaded with ``weights_only=True``)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    run.saved_step = run.step
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(run.model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    state = {"model": unwrapped.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "step": run.step,
             "first_loss": run.first_loss, "losses": list(run.losses), "settings": resume_settings(run.config)}

    def write(folder: Path) -> None:
        base.config.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)
        torch.save(state, folder / STATE_FILE)

    save_checkpoint(run.inputs.output, run.step, write)


class StopSignals:
    """While active, SIGTERM and SIGINT (Ctrl-C) only take note; :meth:`check`, called
    after every finished step, then saves a checkpoint and leaves with exit status 143
    (SIGTERM) or 130 (SIGINT, as KeyboardInterrupt). A second signal stops at once."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
            self.previous = {number: signal.signal(number, self._note) for number in self.HANDLED}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        if self.received is not None:
            self._leave(number)
        self.received = number

    def _leave(self, number: int) -> None:
        if number == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + number)

    def check(self, run: Run) -> None:
        """Leave (after saving this step, unless just saved) when any process got a signal."""
        number = self.received or 0
        if run.accelerator.num_processes > 1:
            number = int(run.accelerator.gather(torch.tensor([number], device=run.accelerator.device)).max())
        if not number:
            return
        if run.saved_step != run.step:
            save_state(run)
        if run.accelerator.is_main_process:
            print(f"{signal.Signals(number).name}: saved step {run.step} in {run.inputs.output}/checkpoint-{run.step};"
                  " continue with --resume", file=sys.stderr)
        self._leave(number)


# -------------------------------------------------------------- evaluation and saving


@torch.no_grad()
def evaluate(model, batches, unigram_token, accelerator) -> dict:
    """Validation loss, main and per-stream top-1 accuracy on target tokens, and the
    accuracy of always predicting the most frequent training target token. The streams run
    only from just before the first target on (left-padded batches: the end of each row)."""
    model.eval()
    streams = accelerator.unwrap_model(model).config.num_spec_streams
    losses, correct, total, unigram_hits, unigram_total = [], [0] * (1 + streams), [0] * (1 + streams), 0, 0
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        losses.append(model(**batch, loss_only=True).loss.float().item())
        labels = batch["labels"]
        first = int((labels != -100).any(dim=0).nonzero()[0]) if bool((labels != -100).any()) else labels.shape[1]
        anchors = torch.arange(max(0, first - 1 - streams), labels.shape[1] - 1, device=labels.device)
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                    stream_positions=anchors if streams else None, logits_to_keep=len(anchors) + 1)
        predictions = [out.logits[:, :-1].argmax(-1)] + [out.stream_logits[:, j].argmax(-1) for j in range(streams)]
        for head, predicted in enumerate(predictions):  # head h at anchor t predicts t + 1 + h
            known = anchors + 1 + head < labels.shape[1]
            target = labels[:, anchors[known] + 1 + head]
            valid = target != -100
            correct[head] += int(((predicted[:, known] == target) & valid).sum())
            total[head] += int(valid.sum())
        targets = labels[:, 1:][labels[:, 1:] != -100]
        unigram_hits += int((targets == unigram_token).sum())
        unigram_total += targets.numel()
    model.train()
    accuracy = [c / max(t, 1) for c, t in zip(correct, total)]
    return {"eval_loss": sum(losses) / len(losses), "main_accuracy": accuracy[0],
            "stream_accuracy": accuracy[1:], "unigram_accuracy": unigram_hits / max(unigram_total, 1)}


def final_evaluation(run: Run, seconds: float) -> dict:
    """The run's summary: losses, throughput and the validation figures."""
    config, accelerator, tokenizer = run.config, run.accelerator, run.tokenizer
    task = dataset_name(dataset_of(config))
    eval_features = [tokenize_example(tokenizer, e, config.max_length) for e in run.inputs.evaluation]
    counts = torch.bincount(torch.tensor([t for f in run.features for t in f["labels"] if t != -100]))
    eval_batches = list(make_batches(eval_features, list(range(len(eval_features))), config.batch_size,
                                     tokenizer.pad_token_id))
    last = run.losses[-10:]
    summary = {"steps": run.step, "first_loss": run.first_loss, "final_loss": sum(last) / len(last),
               "train_split": f"{task}/{run.inputs.train_split}", "eval_split": f"{task}/{config.eval_split}",
               "train_tokens_per_second": run.tokens / seconds if seconds else None,
               "train_flops_per_second": run.flops / seconds if seconds else None,
               "peak_flops_per_second": run.peak_flops,
               "mfu": run.flops / seconds / run.peak_flops if seconds else None,
               **evaluate(run.model, eval_batches, int(counts.argmax()), accelerator),
               **acceptance_rates(accelerator.unwrap_model(run.model), eval_features, accelerator.device,
                                  int(counts.argmax()))}
    streams = ", ".join(f"{a:.3f}" for a in summary["stream_accuracy"]) or "none (no streams)"
    accelerator.print(f"validation loss {summary['eval_loss']:.3f}, main accuracy {summary['main_accuracy']:.3f}, "
                      f"stream accuracy {streams} (unigram {summary['unigram_accuracy']:.3f})")
    if summary["stream_acceptance"]:
        accelerator.print(acceptance_report(summary))
    return summary


def acceptance_report(summary: dict) -> str:
    """Whether the streams learned, in one line: each stream's top-1 acceptance on the
    model's own greedy text beside always drafting the most frequent target token."""
    top1 = [by_rank[0] for by_rank in summary["stream_acceptance"]]
    unigram = summary["unigram_acceptance"]
    verdict = ("the streams learned: stream 1 beats the unigram draft" if top1[0] > unigram + 0.02 else
               "the streams learned nothing beyond the unigram draft: train them longer (--epochs) or on more rows")
    return (f"stream top-1 acceptance on the model's own greedy text: {', '.join(f'{a:.3f}' for a in top1)} "
            f"(always the most frequent target token: {unigram:.3f}); {verdict}")


@torch.no_grad()
def acceptance_rates(model, features: list[dict], device, unigram_token: int) -> dict:
    """``stream_acceptance``, the streams' acceptance by depth and top-k rank
    (`measure_acceptance`), and ``lookup_acceptance``, a prompt-lookup chain's by depth
    (`measure_lookup_acceptance`), on the prompts of up to ``ACCEPTANCE_PROMPTS``
    validation examples: what ``tree_widths="auto"`` sizes the tree from, saved with the
    checkpoint; and ``unigram_acceptance``, the share of the greedy tokens that always
    drafting ``unigram_token`` would get right. All None for a model without streams."""
    if not getattr(model.config, "num_spec_streams", 0):
        return {"stream_acceptance": None, "lookup_acceptance": None, "unigram_acceptance": None}
    room = model.config.max_position_embeddings - defaults.ACCEPTANCE_NEW_TOKENS - model.config.num_spec_streams
    prompts = [[t for t, label in zip(f["input_ids"], f["labels"]) if label == -100][-room:]
               for f in features[:defaults.ACCEPTANCE_PROMPTS]]
    was_training = model.training
    model.eval()
    prompts = [torch.tensor([p], device=device) for p in prompts if p]
    texts = greedy_texts(model, prompts, defaults.ACCEPTANCE_NEW_TOKENS)  # both measures read the same texts
    rates = {"stream_acceptance": measure_acceptance(model, prompts, texts=texts),
             "lookup_acceptance": measure_lookup_acceptance(model, prompts, texts=texts),
             "unigram_acceptance": unigram_share(prompts, texts, unigram_token)}
    model.train(was_training)
    return rates


def unigram_share(prompts: list[torch.Tensor], texts: list[torch.Tensor], token: int) -> float:
    """The share of the new tokens of ``texts`` (after each prompt) that equal ``token``."""
    new = torch.cat([text[0, ids.shape[1]:].cpu() for ids, text in zip(prompts, texts)])
    return float((new == token).float().mean()) if len(new) else 0.0


def save_final(run: Run, summary: dict) -> None:
    """The plain model (LoRA merged), tokenizer and training_args.json, into OUTPUT."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(run.model)
    if hasattr(model, "merge_and_unload"):  # LoRA: save a plain model
        model = model.merge_and_unload()

    generation_note = streams_by_default(model) if model.config.num_spec_streams else "a plain model: no streams"

    if summary.get("stream_acceptance"):  # tree_widths="auto" reads them at generate time
        model.generation_config.stream_acceptance = summary["stream_acceptance"]
        model.generation_config.lookup_acceptance = summary["lookup_acceptance"]

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)

    print(generation_note)
    publish_model(run.inputs.output, write, {"args": dataclasses.asdict(run.config), "summary": summary})


# -------------------------------------------------------------------------- the run


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _processes_on_cpu() -> bool:
    """Processes started by a launcher (torchrun, ``accelerate launch --multi_gpu``) on a
    machine without a GPU: run them on the CPU, where accelerate joins them with gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def check_launch() -> None:
    """A UserError when ``accelerate launch --num_processes N`` (N > 1) started one process:
    on a machine without a GPU its default launcher runs the script once (it sets
    MASTER_PORT but no WORLD_SIZE), which would silently train on one process."""
    launcher = {"ACCELERATE_MIXED_PRECISION", "MASTER_PORT"} <= os.environ.keys()
    if launcher and not {"WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"} & os.environ.keys():
        raise UserError("accelerate launch started one process where several were asked for (without a GPU its "
                        "default launcher starts one); add --multi_gpu to start them on the CPU (gloo): "
                        "accelerate launch --multi_gpu --num_processes N -m spec_stream.finetune ...")


def start(inputs: Inputs) -> None:
    """Prepare OUTPUT once every input has passed: stale temporaries go, and a run that
    starts over (--overwrite) first drops the old run's finished marker."""
    inputs.output.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(inputs.output)
    if inputs.resume is None:
        (inputs.output / TRAINING_ARGS).unlink(missing_ok=True)


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune as ``config`` says; returns the run's summary (losses, validation figures)."""
    check_launch()
    config = check_config(config)
    inputs = load_inputs(config)
    if inputs.summary is not None:
        remove_stale_temporaries(inputs.output)
        print(f"{inputs.output} is already fully trained; nothing to do")
        return inputs.summary
    if config.resume and inputs.resume is None:
        print(f"--resume: no checkpoint in {inputs.output}, starting fresh")
    # the schedule counts global steps: accelerate would step it once per process per step
    accelerator = Accelerator(mixed_precision=_precision(config.mixed_precision), cpu=_processes_on_cpu(),
                              step_scheduler_with_optimizer=False)
    accelerator.print(f"training on {config.dataset}/{inputs.train_split} ({len(inputs.train)} examples), "
                      f"validating on {config.dataset}/{config.eval_split} ({len(inputs.evaluation)} examples)")
    if accelerator.is_main_process:
        start(inputs)
    accelerator.wait_for_everyone()
    run = build_run(config, inputs, accelerator)
    stop = min(run.total_steps, config.max_steps) if config.max_steps else run.total_steps
    started = time.perf_counter()
    with StopSignals() as signals:
        train(run, stop, signals)
        if run.step < run.total_steps:
            accelerator.print(f"stopped at step {run.step}/{run.total_steps} (--max-steps); continue with --resume")
            return {"steps": run.step, "final_loss": run.losses[-1], "first_loss": run.first_loss}
        summary = final_evaluation(run, time.perf_counter() - started)
        signals.check(run)
        save_final(run, summary)
        signals.check(run)
    return summary


@exit_on_user_error
def main(argv=None) -> int:
    finetune(parse_config(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
