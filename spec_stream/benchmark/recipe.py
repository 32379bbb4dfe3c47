"""The default checkpoint of a dataset (`dataset_tps.py` without ``--model``): where it
lives, and its preparation on first use, in two resumable fine-tuning stages (the base,
then the streams on the frozen base), sized for the device."""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from spec_stream import defaults
from spec_stream.checkpoints import MODEL_SIZES, TRAINING_ARGS, load_base_config
from spec_stream.data import CustomDataset
from spec_stream.errors import UserError
from spec_stream.training.config import FinetuneConfig


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
    output = default_recipe(task, device, root).output
    return output if (output / TRAINING_ARGS).is_file() else None


def default_checkpoint(task: str | CustomDataset, device: torch.device, root: Path, data_dir: str | None) -> Path:
    """The fine-tuned checkpoint for ``task`` sized for the device, prepared on first use in
    two resumable stages and reused after: ``<name>-base`` (main stream and streams
    together, from `pretrained_base` or from scratch) and ``<name>-streams`` (the streams
    and their adapters again on the frozen base, learning `defaults.STREAM_TARGETS`)."""
    from spec_stream.finetune import finetune  # the training stack loads only when a checkpoint is due

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


def default_context(device: torch.device) -> int:
    """The positions of the default checkpoints for ``device``, known before they exist."""
    pretrained = pretrained_base(device)
    if pretrained:
        return load_base_config(pretrained).max_position_embeddings
    size = defaults.DEFAULT_RECIPES["cuda" if device.type == "cuda" else "cpu"]["size"]
    return MODEL_SIZES[size]["max_position_embeddings"]


@functools.lru_cache(maxsize=None)
def pretrained_base(device: torch.device) -> str | None:
    """`defaults.PRETRAINED_BASE` on a GPU when the hub (or a local copy) serves it, else
    None: a CPU cannot fine-tune 125M parameters in minutes, and offline there is nothing
    to load, so the base is trained from scratch."""
    if device.type != "cuda":
        return None
    try:
        load_base_config(defaults.PRETRAINED_BASE)
    except UserError:
        print(f"{defaults.PRETRAINED_BASE} is not reachable (offline?): training the base from scratch")
        return None
    return defaults.PRETRAINED_BASE
