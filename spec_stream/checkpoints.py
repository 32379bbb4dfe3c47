"""Building, loading and atomically saving spec-stream checkpoints."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer

from spec_stream import GPTNeoConfig, GPTNeoForCausalLM
from spec_stream.errors import UserError
from spec_stream.tokenization import train_tokenizer

# From-scratch shapes. `125M` is GPT-Neo-125M (vocab 50257 in the model even when the
# trained tokenizer is smaller, so compute and memory match the real model).
MODEL_SIZES = {
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]],
                 window_size=32, max_position_embeddings=1024, tokenizer_vocab=2048, vocab_size=2048),
    "small": dict(hidden_size=256, num_layers=6, num_heads=8, attention_types=[[["global", "local"], 3]],
                  window_size=256, max_position_embeddings=2048, tokenizer_vocab=8192, vocab_size=8192),
    "125M": dict(hidden_size=768, num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]],
                 window_size=256, max_position_embeddings=2048, tokenizer_vocab=16384, vocab_size=50257),
}
TRAINING_ARGS = "training_args.json"


def default_stream_layers(task: str, num_layers: int) -> int:
    """The paper's N_s: the top 1/6 of the layers for SQL, 1/2 for DialogSum and E2E."""
    share = 1 / 6 if task == "spider" else 1 / 2
    return max(1, round(num_layers * share))


def build_from_scratch(size: str, texts, num_spec_streams: int, num_stream_layers: int | None, task: str):
    """A fresh GPT-Neo of ``size`` with a BPE tokenizer trained on ``texts``."""
    if size not in MODEL_SIZES:
        raise UserError(f"unknown --from-scratch size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    shape = dict(MODEL_SIZES[size])
    tokenizer = train_tokenizer(texts, shape.pop("tokenizer_vocab"))
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    layers = num_stream_layers if num_stream_layers is not None else default_stream_layers(task, shape["num_layers"])
    config = GPTNeoConfig(
        **shape, num_spec_streams=num_spec_streams, num_stream_layers=layers if num_spec_streams else 0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoForCausalLM(config), tokenizer


def load_base(name: str, num_spec_streams: int, num_stream_layers: int | None, task: str):
    """Any GPT-Neo checkpoint (upstream's or ours, a folder or a hub id) with its own
    tokenizer; stream weights it lacks are initialised (transformers logs which)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        config = GPTNeoConfig.from_pretrained(name)
        layers = num_stream_layers if num_stream_layers is not None else default_stream_layers(task, config.num_layers)
        model = GPTNeoForCausalLM.from_pretrained(
            name, num_spec_streams=num_spec_streams, num_stream_layers=layers if num_spec_streams else 0
        )
    except OSError as error:
        raise UserError(f"cannot load base model {name!r} ({str(error).splitlines()[0][:160]}); check the path or hub "
                        "id, or train from scratch offline with --from-scratch SIZE") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_for_inference(path: str, require_streams: bool = False):
    """(model, tokenizer) of a saved checkpoint, with clear errors for a wrong path or, when
    ``require_streams``, a checkpoint whose streams are absent or were never trained."""
    fix = "fine-tune one with: python -m spec_stream.finetune --dataset NAME --output DIR"
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint folder (no config.json); {fix}")
    config = GPTNeoConfig.from_pretrained(path)
    if require_streams:
        if not config.num_spec_streams:
            raise UserError(f"{path} has no speculative stream weights (num_spec_streams=0); {fix}")
        if not (folder / TRAINING_ARGS).is_file():
            raise UserError(f"{path} has stream weights that were never trained (no {TRAINING_ARGS}); {fix}")
    return GPTNeoForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def atomic_directory(target: Path):
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` in
    one rename, so a crash never leaves a half-written checkpoint."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield temporary
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(temporary, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
