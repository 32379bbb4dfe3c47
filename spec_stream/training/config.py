"""Every setting of a fine-tuning run (`FinetuneConfig`, one field per command-line flag)
and their checks on their own, before any file is read (`check_config`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from spec_stream import defaults
from spec_stream.checkpoints import MODEL_SIZES, check_path_text
from spec_stream.data import CustomDataset, resolve_dataset
from spec_stream.errors import UserError


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
    save_every: int = defaults.SAVE_EVERY
    resume: bool = False
    overwrite: bool = False
    mixed_precision: str = defaults.MIXED_PRECISION
    peak_tflops: float = defaults.GPU_PEAK_TFLOPS


# Settings that shape the training trajectory: `--resume` refuses a run that changes one.
RESUME_SETTINGS = ("dataset", "prompt_template", "response_field", "response_template", "train_split",
                   "max_train_samples", "epochs", "batch_size", "max_length", "lr", "warmup_ratio", "seed",
                   "num_spec_streams", "num_stream_layers", "main_loss_weight", "stream_loss_weight", "lora_rank",
                   "freeze_base", "stream_adapter_rank", "stream_targets")
PRECISIONS = ("auto", "no", "bf16", "fp16")
PATH_SETTINGS = ("dataset", "output", "data_dir", "base", "train_split", "eval_split")  # name files, or parts of names
STREAM_TARGETS = ("references", "distill", "greedy")  # what the streams learn to predict (--stream-targets)


def dataset_of(config: FinetuneConfig) -> str | CustomDataset:
    """The preset or custom dataset that --dataset and the template flags name."""
    return resolve_dataset(config.dataset, config.prompt_template, config.response_field, config.response_template)


def default_learning_rate(size: str | None, freeze_base: bool) -> float:
    """The peak rate when --lr is not given: from scratch, the size's; with the base frozen,
    the stream adapters' (they start at zero); else the paper's fine-tuning rate."""
    if freeze_base:
        return defaults.LEARNING_RATE_FROZEN_BASE
    return defaults.LEARNING_RATE_FROM_SCRATCH.get(size, defaults.LEARNING_RATE)


def adapter_rank_of(config: FinetuneConfig) -> int:
    """--stream-adapter-rank, or its default: adapters with --freeze-base, none otherwise."""
    if config.stream_adapter_rank is not None:
        return config.stream_adapter_rank
    return defaults.STREAM_ADAPTER_RANK if config.freeze_base else 0


def resume_settings(config: FinetuneConfig) -> dict:
    return {name: getattr(config, name) for name in RESUME_SETTINGS}


def check_sizes(config: FinetuneConfig) -> None:
    """Numbers no run can use: not finite, a seed that torch and numpy cannot take, an
    example too short for a prompt and a target token, more streams than it has tokens."""
    for name in ("epochs", "lr", "warmup_ratio", "main_loss_weight", "stream_loss_weight", "peak_tflops"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(f"--{name.replace('_', '-')} {getattr(config, name)}: pass a finite number")
    if not 0 <= config.seed < defaults.SEED_LIMIT:
        raise UserError(f"--seed {config.seed}: pass a seed from 0 to {defaults.SEED_LIMIT - 1}")
    if config.max_length < 2:
        raise UserError(f"--max-length {config.max_length} holds no prompt token beside a target token; pass 2 or "
                        f"more (default {defaults.MAX_LENGTH})")
    if config.num_spec_streams > config.max_length - 2:
        raise UserError(f"--num-spec-streams {config.num_spec_streams}: stream j predicts the token j + 1 places "
                        f"further, so with --max-length {config.max_length} at most {config.max_length - 2} "
                        f"streams ever have a target; pass fewer streams (default {defaults.NUM_SPEC_STREAMS})")


def check_config(config: FinetuneConfig) -> FinetuneConfig:
    """The settings on their own (no file is read): a UserError for a bad one, else the
    config with the preset's name, model size and learning rate filled in."""
    for name in PATH_SETTINGS:
        check_path_text(getattr(config, name), f"--{name.replace('_', '-')}")
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
    check_sizes(config)
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
