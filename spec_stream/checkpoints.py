"""Building and loading spec-stream checkpoints, and the crash-safe layout of a
fine-tuning output folder.

An output folder holds the final model files, ``training_args.json`` (written last: its
presence means the run finished) and ``checkpoint-<step>/`` (the newest resumable state).
Every write goes to a hidden ``.spec-stream-*.tmp`` entry first and is published by one
rename, and a folder is removed by renaming it to such an entry before deleting it, so a
run killed at any moment leaves complete visible files plus stale temporaries, which the
next start removes. Nothing else in the folder is touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer

from huggingface.transformers.internals import set_private
from spec_stream import GPTNeoConfig, GPTNeoForCausalLM, defaults
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
STATE_FILE = "state.pt"
TEMPORARY_PREFIX = ".spec-stream-"
TEMPORARY_SUFFIX = ".tmp"
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
NAME_MAX, PATH_MAX = 255, 4096  # bytes in a file name and in a path (Linux)
WEIGHTS_FILE = "model.safetensors"
STREAM_EMBEDDINGS = "transformer.streams.embeddings"  # (num_spec_streams, hidden): one row per stream


def default_stream_layers(task: str, num_layers: int) -> int:
    """The paper's N_s: the top 1/6 of the layers for SQL, 1/2 for DialogSum and E2E; but
    half for SQL too on models of up to 6 layers, where one stream layer is too little (the
    `small` Spider checkpoint: (4,3,2) tokens per call 1.95 with 1 layer, 2.21 with 3;
    docs/method.md, section 2)."""
    share = 1 / 6 if task == "spider" and num_layers > 6 else 1 / 2
    return max(1, round(num_layers * share))


def stream_layers(requested: int | None, task: str, num_layers: int) -> int:
    """``requested`` (``--num-stream-layers``) checked against the model, or the paper's default."""
    if requested is None:
        return default_stream_layers(task, num_layers)
    if not 1 <= requested <= num_layers:
        raise UserError(f"--num-stream-layers {requested} does not fit a model of {num_layers} layers; choose 1 to "
                        f"{num_layers} (default {default_stream_layers(task, num_layers)} for {task})")
    return requested


def build_from_scratch(size: str, texts, num_spec_streams: int, num_stream_layers: int | None, task: str):
    """A fresh GPT-Neo of ``size`` with a BPE tokenizer trained on ``texts``."""
    if size not in MODEL_SIZES:
        raise UserError(f"unknown --from-scratch size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    shape = dict(MODEL_SIZES[size])
    layers = stream_layers(num_stream_layers, task, shape["num_layers"])
    tokenizer = train_tokenizer(texts, shape.pop("tokenizer_vocab"))
    tokenizer.model_max_length = shape["max_position_embeddings"]  # saved with it: pipelines truncate there
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = GPTNeoConfig(
        **shape, num_spec_streams=num_spec_streams, num_stream_layers=layers if num_spec_streams else 0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return GPTNeoForCausalLM(config), tokenizer


BASE_FIX = "check the path or hub id, or train from scratch offline with --from-scratch SIZE"


def load_base_config(name: str) -> GPTNeoConfig:
    """The config of a base checkpoint (a folder or a hub id), read before any weights."""
    try:
        return GPTNeoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load base model {name!r} ({str(error).splitlines()[0][:160]}); {BASE_FIX}") from None


def load_tokenizer(path: str, fix: str):
    """The tokenizer of a checkpoint; missing or damaged files are a UserError naming ``fix``."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001  (a damaged tokenizer.json raises KeyError, Exception, ...)
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise UserError(f"cannot load the tokenizer of {path} ({type(error).__name__}: {reason}); copy its "
                        f"tokenizer files again, or {fix}") from None


def check_base(name: str, num_spec_streams: int) -> GPTNeoConfig:
    """The config of a base checkpoint, with its tokenizer loaded and its weights file (when
    a local folder holds one) checked against the config and ``num_spec_streams``
    (``--num-spec-streams``): trained streams are kept, so their number must match (0 drops them)."""
    config = load_base_config(name)
    load_tokenizer(name, BASE_FIX)
    held = check_weights_match_config(name, config)
    if held and num_spec_streams and num_spec_streams != held:
        raise UserError(f"--num-spec-streams {num_spec_streams}, but --base {name} holds {held} trained speculative "
                        f"streams; pass --num-spec-streams {held} to keep training them, or 0 for a plain model")
    return config


def load_base(name: str, num_spec_streams: int, num_stream_layers: int | None, task: str):
    """Any GPT-Neo checkpoint (upstream's or ours, a folder or a hub id) with its own
    tokenizer; stream weights it lacks are initialised (transformers logs which)."""
    layers = stream_layers(num_stream_layers, task, load_base_config(name).num_layers)
    tokenizer = load_tokenizer(name, BASE_FIX)
    try:
        model = GPTNeoForCausalLM.from_pretrained(
            name, num_spec_streams=num_spec_streams, num_stream_layers=layers if num_spec_streams else 0
        )
    except SafetensorError as error:
        raise damaged_weights(name, error) from None
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load base model {name!r} ({str(error).splitlines()[0][:160]}); {BASE_FIX}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = model.config.max_position_embeddings  # a hub tokenizer may say 1e30
    return model, tokenizer


def streams_by_default(model) -> str:
    """Make speculative streaming the default of ``model.generate`` and of pipelines once
    the model is saved: ``speculative_streaming`` and ``tree_widths`` in its generation
    config (``generation_config.json``). Returns a line saying so, for the log."""
    config = model.generation_config
    config.speculative_streaming = True
    config.tree_widths = defaults.TREE_WIDTHS_SAVED
    set_private(config, "_from_model_config", False)  # else from_pretrained drops the two settings above
    return (f"generation_config.json: speculative_streaming=True, tree_widths={config.tree_widths!r}: generate() and "
            "pipelines decode greedily with the streams by default (speculative_streaming=False turns them off)")


def damaged_weights(path: str, error: Exception) -> UserError:
    """The error for a weights file that safetensors cannot read (cut short, overwritten)."""
    return UserError(f"{Path(path) / WEIGHTS_FILE} is truncated or damaged ({error}); delete {path} and prepare it "
                     "again, or copy the file again")


def weights_streams(path: str) -> int | None:
    """Speculative streams the weights file of checkpoint folder ``path`` holds (0: none),
    read from its header alone; None when there is no local file to read (a hub id, a
    sharded or a PyTorch weights file). A damaged file is a UserError."""
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        return None
    try:
        with safe_open(weights, "pt") as handle:
            if STREAM_EMBEDDINGS not in handle.keys():
                return 0
            return handle.get_slice(STREAM_EMBEDDINGS).get_shape()[0]
    except (SafetensorError, OSError) as error:
        raise damaged_weights(path, error) from None


def check_weights_match_config(path: str, config) -> int | None:
    """A UserError when the weights of ``path`` hold trained streams that its config does not
    describe: another number (from_pretrained would fail on the shapes) or none (it would
    drop them without a word). Returns the streams the weights hold (None: not readable here)."""
    held = weights_streams(path)
    configured = getattr(config, "num_spec_streams", 0) or 0
    if held and held != configured:
        raise UserError(f"{path}: its config.json says num_spec_streams={configured} but its weights hold {held} "
                        f"speculative streams; set \"num_spec_streams\": {held} in {Path(path) / 'config.json'}, or "
                        "save the checkpoint again from the model it came from")
    return held


def load_for_inference(path: str, require_streams: bool = False):
    """(model, tokenizer) of a checkpoint folder or hub id, every problem a UserError that
    names it: no such folder (or an unreachable hub id), a missing or damaged config or
    weights file, and, when ``require_streams``, streams that are absent from the config,
    missing from the weights file (a checkpoint saved through upstream GPT-Neo, say), or
    never trained."""
    fix = "fine-tune one with: python -m spec_stream.finetune --dataset NAME --output DIR"
    check_path_text(path, "checkpoint")
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint folder (no config.json); {fix}")
    if not folder.is_dir() and (folder.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path))):
        raise UserError(f"{path}: no such checkpoint folder; {fix}")
    try:
        config = GPTNeoConfig.from_pretrained(path)
        check_weights_match_config(path, config)
        tokenizer = load_tokenizer(path, fix)
        model, info = GPTNeoForCausalLM.from_pretrained(path, output_loading_info=True)
    except SafetensorError as error:
        raise damaged_weights(path, error) from None
    except UserError:
        raise
    except (OSError, ValueError) as error:  # no folder and no hub repo, a missing or damaged file
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        problem = f"cannot load {path}" if folder.is_dir() else f"{path} is neither a folder nor a reachable hub id"
        raise UserError(f"{problem} ({reason}); {fix}") from None
    if require_streams:
        if not config.num_spec_streams:
            raise UserError(f"{path} has no speculative stream weights (num_spec_streams=0); {fix}")
        if "transformer.streams.embeddings" in info["missing_keys"]:
            raise UserError(f"{path}: its config has {config.num_spec_streams} speculative streams but its weights "
                            "file lacks them (saved without the streams, e.g. through upstream GPT-Neo); fine-tune "
                            f"them: python -m spec_stream.finetune --base {path} --dataset NAME --output DIR")
        if not (folder / TRAINING_ARGS).is_file():
            raise UserError(f"{path} has stream weights that were never trained (no {TRAINING_ARGS}); {fix}")
    return model.eval(), tokenizer


# ------------------------------------------------------------------ the output folder


def check_output_path(path: Path, flag: str = "--output") -> None:
    """A UserError unless ``path`` is, or can become, a writable folder."""
    with path_errors(path, flag):
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag} {path} is an existing file; pass a folder path (new, empty, or an earlier run's)")
        existing = next(p for p in [path, *path.parents] if p.exists())
        if not existing.is_dir():
            raise UserError(f"{flag} {path} lies under the file {existing}; pass a folder path")
        problem = write_problem(existing)
    if problem:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({problem}); pass a folder you can write to")


def check_result_file(path: Path, flag: str, overwrite: bool, example: str) -> None:
    """Fail now, not after the work: ``path`` must be a file path in a writable place, new
    unless ``overwrite`` (a result is never replaced unasked); ``example``: a file name to
    suggest when ``path`` is a folder."""
    with path_errors(path, flag):
        if path.is_dir():
            raise UserError(f"{flag} {path} is a folder; name a file, e.g. {flag} {path / example}")
        if path.exists() and not path.is_file():
            raise UserError(f"{flag} {path} is not a regular file; name a file, e.g. {example}")
        if path.exists() and not overwrite:
            raise UserError(f"{flag} {path} already exists; pass --overwrite to replace it, or name another file")
        existing = next(folder for folder in path.parents if folder.exists())
        if not existing.is_dir():
            raise UserError(f"{flag} {path} lies under the file {existing}; choose a path under a folder")
        problem = write_problem(existing)
    if problem:
        raise UserError(f"{flag} {path}: cannot write in {existing} ({problem}); choose a folder you can write to")


def check_path_text(value, flag: str) -> None:
    """A UserError for a path (or a name that becomes part of one) no file system takes: a
    NUL byte, a name longer than NAME_MAX bytes, or more than PATH_MAX bytes in all."""
    text = "" if value is None else str(value)
    names = text.split("/")
    if "\0" in text or len(text.encode()) >= PATH_MAX or max(len(name.encode()) for name in names) > NAME_MAX:
        raise UserError(f"{flag} {text[:60]!r}{'...' if len(text) > 60 else ''} is not a usable path (a NUL byte, a "
                        f"name over {NAME_MAX} bytes or more than {PATH_MAX} in all); pass an ordinary path")


@contextlib.contextmanager
def path_errors(path: Path, flag: str):
    """A path the system refuses to look at (a NUL byte, a name too long, a loop of links)
    as a UserError naming ``flag``."""
    check_path_text(path, flag)
    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UserError(f"{flag} {str(path)[:80]!r} is not a usable path ({reason}); pass an ordinary path") from None


def write_problem(folder: Path) -> str | None:
    """Why no file can be made in ``folder`` (tried, as root passes every permission
    check: /sys refuses it anyway), or None when one can."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror or type(error).__name__


def _temporary(folder: Path, kind: str) -> Path:
    """A fresh hidden name in ``folder`` that :func:`remove_stale_temporaries` recognises."""
    return folder / f"{TEMPORARY_PREFIX}{kind}-{secrets.token_hex(4)}{TEMPORARY_SUFFIX}"


def _is_temporary(path: Path) -> bool:
    return path.name.startswith(TEMPORARY_PREFIX) and path.name.endswith(TEMPORARY_SUFFIX)


def remove_stale_temporaries(folder: Path) -> None:
    """Delete what a killed run left half-written or half-deleted in ``folder``."""
    for path in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):  # another process of the same run was first
            if _is_temporary(path) and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif _is_temporary(path):
                path.unlink()


def visible_entries(folder: Path) -> list[str]:
    """Names in ``folder`` other than stale temporaries (none for a new folder)."""
    return sorted(p.name for p in folder.iterdir() if not _is_temporary(p)) if folder.is_dir() else []


def is_run_folder(folder: Path) -> bool:
    """Whether an earlier fine-tuning run wrote into ``folder``."""
    return (folder / TRAINING_ARGS).is_file() or bool(list_checkpoints(folder))


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every published checkpoint in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (published ones are always complete), or None."""
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _retire(path: Path) -> None:
    """Delete a published folder: hidden first, so a kill mid-deletion leaves a temporary."""
    hidden = _temporary(path.parent, f"old-{path.name}")
    os.replace(path, hidden)
    shutil.rmtree(hidden)


def _finish_files(folder: Path) -> None:
    """Before ``folder``'s files are published: flush them to disk and give them ordinary
    permissions (the umask's, as the folder got; safetensors writes 0600)."""
    mode = folder.stat().st_mode & 0o666
    for path in folder.iterdir():
        path.chmod(mode)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def save_checkpoint(output: Path, step: int, write: Callable[[Path], None]) -> Path:
    """Publish ``output/checkpoint-<step>`` written by ``write(folder)``, then drop the older ones.

    The new checkpoint becomes visible in one rename after it is complete; older ones go
    only after that, so at every moment the newest visible checkpoint is complete.
    """
    temporary = _temporary(output, "checkpoint")
    temporary.mkdir()
    write(temporary)
    _finish_files(temporary)
    target = output / f"checkpoint-{step}"
    if target.exists():  # an earlier run's, at the same step (--overwrite)
        _retire(target)
    os.replace(temporary, target)
    for _, older in list_checkpoints(output):
        if older != target:
            _retire(older)
    return target


def publish_model(output: Path, write: Callable[[Path], None], training_args: dict) -> None:
    """Move the files ``write(folder)`` produces into ``output``, then write ``training_args``.

    Files are moved one rename each, beside whatever else ``output`` holds. The finished
    marker (``training_args.json``) is removed first and written last, so a kill in
    between leaves no marker and ``--resume`` redoes the final evaluation and save.
    """
    temporary = _temporary(output, "final")
    temporary.mkdir()
    write(temporary)
    _finish_files(temporary)
    (output / TRAINING_ARGS).unlink(missing_ok=True)
    for path in sorted(temporary.iterdir()):
        os.replace(path, output / path.name)
    write_json(output / TRAINING_ARGS, training_args)
    temporary.rmdir()


def write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON in one rename (a reader never sees half a file)."""
    temporary = _temporary(path.parent, path.stem)
    temporary.write_text(json.dumps(data, indent=2, default=str))
    os.replace(temporary, path)


def read_json(path: Path, fix: str) -> dict:
    """A JSON file written by a run; a damaged one is a UserError naming it and ``fix``."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path} is damaged ({type(error).__name__}: {str(error)[:120]}); {fix}") from None


def load_checkpoint(folder: Path, fix: str):
    """``(state, config, tokenizer)`` of a checkpoint, every file checked before use: a
    missing or damaged one is a UserError naming it and ``fix``."""
    for path in sorted(folder.glob("*.json")):
        read_json(path, fix)
    state_file = folder / STATE_FILE
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (truncated zip, empty file, foreign pickle, ...)
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{state_file} is missing or damaged ({type(error).__name__}: {reason}); {fix}") from None
    missing = [key for key in ("model", "optimizer", "scheduler", "torch_rng", "step", "losses", "settings")
               if key not in state]
    if missing:
        raise UserError(f"{state_file} lacks {', '.join(missing)} (not written by this version); {fix}")
    try:
        return state, GPTNeoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001  (missing config or tokenizer files)
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise UserError(f"the config or tokenizer files in {folder} are missing or damaged ({reason}); {fix}") from None
