"""Fine-tuning on real rows of E2E-NLG with tiny from-scratch models (CPU): training,
the command line, bad inputs, the output folder, kills at every point of a save, signals."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

import spec_stream.training.evaluation as evaluation_module
import spec_stream.training.loop as loop_module
from spec_stream import GPTNeoForCausalLM, defaults
from spec_stream.checkpoints import latest_checkpoint
from spec_stream.data import load_examples
from spec_stream.errors import UserError, exit_on_user_error
from spec_stream.finetune import build_parser, finetune, main, parse_config
from spec_stream.training.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]

# A run small enough to repeat many times: 12 examples in batches of 4 for 2 epochs = 6
# steps, checkpoints at steps 2, 3 (epoch end), 4 and 6.
RESUMABLE = dict(dataset="e2e_nlg", from_scratch="tiny", max_train_samples=12, batch_size=4, epochs=2.0,
                 max_length=64, max_eval_samples=4, save_every=2, seed=3)


def resumable(output, data_dir, **overrides) -> FinetuneConfig:
    return FinetuneConfig(**{**RESUMABLE, "output": str(output), "data_dir": str(data_dir), **overrides})


def argv_of(config: FinetuneConfig) -> list[str]:
    """The command line that gives ``config``."""
    argv = []
    for name, value in asdict(config).items():
        if value is True:
            argv.append("--" + name.replace("_", "-"))
        elif value is not None and value is not False:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def cli(argv, capsys) -> tuple[int, str]:
    """``main(argv)`` in this process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def listing(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes (empty for a missing folder)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def assert_same(a, b, path="state"):
    """Bitwise equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{index}]")
    else:
        assert a == b, path


def load_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", weights_only=True)


def model_weights(output: Path) -> dict:
    return GPTNeoForCausalLM.from_pretrained(output).state_dict()


def without_timing(summary: dict) -> dict:
    timing = {"train_tokens_per_second", "train_flops_per_second", "peak_flops_per_second", "mfu"}
    return {k: v for k, v in summary.items() if k not in timing}


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def ordinary_folder_mode(tmp_path: Path) -> int:
    """The mode the umask gives a new folder (files get it without the x bits)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    return probe.stat().st_mode & 0o777


# -------------------------------------------------------------------- shared runs


@dataclass
class Reference:
    """The uninterrupted RESUMABLE run and copies of its checkpoints as they were published."""

    output: Path
    summary: dict
    copies: Path

    def start_from(self, step: int, into: Path) -> Path:
        """A run folder holding only the checkpoint of ``step``, as a run killed after it leaves it."""
        shutil.copytree(self.copies / f"at-{step}", into)
        return into


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("reference")
    publish = loop_module.save_checkpoint

    def publish_and_copy(output, step, write):
        folder = publish(output, step, write)
        shutil.copytree(folder, root / "copies" / f"at-{step}" / folder.name)
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", publish_and_copy)
        summary = finetune(resumable(root / "straight", data_dir))
    assert sorted(p.name for p in (root / "copies").iterdir()) == ["at-2", "at-3", "at-4", "at-6"]
    return Reference(root / "straight", summary, root / "copies")


@pytest.mark.trains
def test_training_lowers_loss_and_streams_beat_unigram(finetuned_checkpoint):
    _, summary = finetuned_checkpoint
    assert summary["final_loss"] < summary["first_loss"] - 2.0
    assert summary["stream_accuracy"][0] > summary["unigram_accuracy"] + 0.03
    assert summary["main_accuracy"] > summary["unigram_accuracy"] + 0.03


def test_final_checkpoint_loads_and_names_its_splits(finetuned_checkpoint):
    output, _ = finetuned_checkpoint
    model = GPTNeoForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model.config.num_spec_streams == 3 and tokenizer.eos_token_id is not None
    saved = json.loads((output / "training_args.json").read_text())
    assert saved["summary"]["train_split"] == "e2e_nlg/train"
    assert saved["summary"]["eval_split"] == "e2e_nlg/validation"
    assert saved["args"]["lr"] == 2e-3 and saved["args"]["seed"] == 3 and "train_pruner" not in saved["args"]
    assert [p.name for p in output.glob("checkpoint-*")] == [f"checkpoint-{saved['summary']['steps']}"]


def test_freeze_base_keeps_every_main_stream_weight(finetuned_checkpoint, tmp_path, data_dir):
    base, _ = finetuned_checkpoint
    finetune(FinetuneConfig(dataset="e2e_nlg", output=str(tmp_path / "frozen"), data_dir=str(data_dir), base=str(base),
                            freeze_base=True, max_train_samples=16, max_eval_samples=4, batch_size=8, max_length=128))
    before, after = model_weights(base), model_weights(tmp_path / "frozen")
    streams = [k for k in before if "transformer.streams." in k]
    assert streams and all(torch.equal(before[k], after[k]) for k in before if k not in streams)
    assert not torch.equal(before["transformer.streams.embeddings"], after["transformer.streams.embeddings"])
    saved = json.loads((tmp_path / "frozen" / "training_args.json").read_text())
    assert saved["args"]["lr"] == defaults.LEARNING_RATE_FROZEN_BASE != defaults.LEARNING_RATE  # the adapters' rate


def test_lora_run_saves_a_plain_model(tmp_path, data_dir):
    finetune(FinetuneConfig(dataset="e2e_nlg", output=str(tmp_path / "lora"), data_dir=str(data_dir),
                            from_scratch="tiny", lora_rank=4, max_train_samples=16, max_eval_samples=4, batch_size=8,
                            max_length=128))
    model = GPTNeoForCausalLM.from_pretrained(tmp_path / "lora")
    assert not any("lora" in k for k in model.state_dict())


# ------------------------------------------------------------- settings and the CLI


def test_command_line_fills_the_config_with_its_defaults():
    assert parse_config(["--dataset", "e2e_nlg", "--output", "o"]) == FinetuneConfig(dataset="e2e_nlg", output="o")
    config = FinetuneConfig(dataset="spider", output="o", epochs=2.5, max_steps=7, freeze_base=True, base="b")
    assert parse_config(argv_of(config)) == config
    assert FinetuneConfig("e2e_nlg", "o").batch_size == defaults.BATCH_SIZE
    assert FinetuneConfig("e2e_nlg", "o").stream_loss_weight == defaults.STREAM_LOSS_WEIGHT


def test_help_shows_every_option_with_its_default():
    text = build_parser().format_help()
    blocks = {block.split()[0]: " ".join(block.split()) for block in text.split("\n  --")[1:]}
    for name, value in asdict(FinetuneConfig("e2e_nlg", "o")).items():
        flag = name.replace("_", "-")
        assert flag in blocks, flag
        if name in ("dataset", "output") or isinstance(value, bool):
            continue  # required, or a switch (off unless given)
        shown = f"(default: {value})" if value is not None else "default:"
        assert shown in blocks[flag], (flag, blocks[flag])


def test_only_user_errors_become_exit_2(capsys):
    def failing(error):
        @exit_on_user_error
        def entry():
            raise error
        return entry

    with pytest.raises(SystemExit) as exit:
        failing(UserError("bad --flag; use another"))()
    assert exit.value.code == 2 and capsys.readouterr().err == "error: bad --flag; use another\n"
    with pytest.raises(SystemExit) as exit:
        failing(KeyboardInterrupt())()
    assert exit.value.code == 130
    with pytest.raises(ValueError, match="a bug"):  # a library bug keeps its traceback
        failing(ValueError("a bug"))()


# ------------------------------------------------------------------ bad inputs


def empty_split_dir(tmp_path, data_dir, empty: str) -> Path:
    """A data folder whose e2e_nlg ``empty`` split is a 0-byte file."""
    folder = tmp_path / "data" / "e2e_nlg"
    folder.mkdir(parents=True)
    for split in ("train", "validation"):
        source = data_dir / "e2e_nlg" / f"{split}.jsonl"
        lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:20]
        (folder / f"{split}.jsonl").write_text("" if split == empty else "".join(lines), encoding="utf-8")
    return tmp_path / "data"


BAD_FLAGS = [
    (["--dataset", "squad"], ["unknown task 'squad'", "e2e_nlg"]),
    (["--from-scratch", "huge"], ["--from-scratch size 'huge'", "tiny"]),
    (["--from-scratch", "tiny", "--base", "x"], ["exclude", "pick one"]),
    (["--epochs", "0"], ["--epochs must be positive"]),
    (["--num-stream-layers", "9"], ["--num-stream-layers 9 does not fit a model of 6 layers", "choose 1 to 6"]),
    (["--max-steps", "0"], ["--max-steps must be at least 1, got 0", "leave it out"]),
    (["--max-steps", "-3"], ["--max-steps must be at least 1, got -3"]),
    (["--max-train-samples", "0"], ["--max-train-samples must be at least 1, got 0", "train on all"]),
    (["--max-train-samples", "-1"], ["--max-train-samples must be at least 1, got -1"]),
    (["--freeze-base", "--from-scratch", "tiny"], ["--freeze-base", "needs --base", "drop --freeze-base"]),
    (["--freeze-base"], ["--freeze-base", "needs --base"]),
    (["--max-length", "4096"], ["--max-length 4096 exceeds the model's 2048 positions", "--max-length 2048 or less"]),
    (["--warmup-ratio", "1.5"], ["--warmup-ratio must lie in [0, 1)"]),
    (["--data-dir", "/nonexistent"], ["/nonexistent does not exist", "--data-dir"]),
]


@pytest.mark.parametrize("flags, words", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2_before_any_work(tmp_path, data_dir, capsys, flags, words):
    output = tmp_path / "out"
    argv = ["--dataset", "e2e_nlg", "--output", output, "--data-dir", data_dir, "--max-train-samples", "8", *flags]
    code, err = cli(argv, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert all(word in err for word in words), err
    assert "--limit" not in err and not output.exists()


@pytest.mark.parametrize("empty, flag", [("train", "--train-split"), ("validation", "--eval-split")])
def test_empty_split_is_refused_before_any_step(tmp_path, data_dir, capsys, empty, flag):
    data = empty_split_dir(tmp_path, data_dir, empty)
    code, err = cli(["--dataset", "e2e_nlg", "--output", tmp_path / "out", "--data-dir", data], capsys)
    assert code == 2 and f"e2e_nlg/{empty} has no examples" in err and flag in err, err
    assert not (tmp_path / "out").exists()


def test_non_utf8_data_names_file_and_line(tmp_path, data_dir, capsys):
    data = empty_split_dir(tmp_path, data_dir, empty="none")
    train = data / "e2e_nlg" / "train.jsonl"
    lines = train.read_bytes().splitlines(keepends=True)
    train.write_bytes(b"".join(lines[:4]) + lines[4].replace(b"name", b"n\xe9me", 1) + b"".join(lines[5:]))
    code, err = cli(["--dataset", "e2e_nlg", "--output", tmp_path / "out", "--data-dir", data], capsys)
    assert code == 2 and f"{train} line 5: byte 0xe9" in err and "UTF-8" in err, err


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_output_that_is_a_file_is_refused(tmp_path, data_dir, capsys, where):
    (tmp_path / "taken").write_text("user data")
    output = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    code, err = cli(["--dataset", "e2e_nlg", "--output", output, "--data-dir", data_dir], capsys)
    assert code == 2 and str(tmp_path / "taken") in err and "pass a folder path" in err, err
    assert (tmp_path / "taken").read_text() == "user data"


def test_resume_with_other_settings_names_them(reference, tmp_path, data_dir, capsys):
    output = reference.start_from(2, tmp_path / "run")
    before = listing(output)
    config = resumable(output, data_dir, resume=True, batch_size=8, dataset="spider")
    code, err = cli(argv_of(config), capsys)
    assert code == 2 and "--resume: this run differs" in err, err
    assert "--dataset spider (saved: e2e_nlg)" in err and "--batch-size 8 (saved: 4)" in err
    assert "drop --resume" in err and "--epochs" not in err
    assert listing(output) == before


def damage(checkpoint: Path, file: str, how: str) -> None:
    path = checkpoint / file
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a pickle of an arbitrary object, which weights_only=True refuses to load
        torch.save({"step": 2, "settings": argparse.Namespace(batch_size=4)}, path)


@pytest.mark.parametrize("file, how", [("state.pt", "truncated"), ("state.pt", "empty"), ("state.pt", "pickle"),
                                       ("config.json", "truncated"), ("tokenizer.json", "truncated")])
def test_damaged_checkpoint_names_the_file(reference, tmp_path, data_dir, capsys, file, how):
    output = reference.start_from(2, tmp_path / "run")
    damage(output / "checkpoint-2", file, how)
    before = listing(output)
    code, err = cli(argv_of(resumable(output, data_dir, resume=True)), capsys)
    assert code == 2 and str(output / "checkpoint-2" / file) in err, err
    assert f"delete {output / 'checkpoint-2'}" in err and "drop --resume" in err
    assert listing(output) == before


# ------------------------------------------------------------------ the output folder


def test_foreign_folder_is_refused_then_only_gains_our_files(tmp_path, data_dir, capsys):
    output = tmp_path / "mine"
    (output / "notes").mkdir(parents=True)
    (output / "notes" / "a.txt").write_text("keep me")
    (output / "README.md").write_text("my project")
    before = listing(output)
    config = resumable(output, data_dir, max_train_samples=4, epochs=1.0)
    code, err = cli(argv_of(config), capsys)
    assert code == 2 and "already holds other files (README.md, notes" in err and "--overwrite" in err, err
    assert listing(output) == before
    finetune(resumable(output, data_dir, max_train_samples=4, epochs=1.0, overwrite=True))
    after = listing(output)
    assert {k: after[k] for k in before} == before  # the user's files, byte for byte
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_args.json", "checkpoint-1"} <= set(after)
    assert not temporaries(output)
    folder_mode = ordinary_folder_mode(tmp_path)
    for path in (output, output / "checkpoint-1"):
        assert path.stat().st_mode & 0o777 == folder_mode, path
    for path in (output / "model.safetensors", output / "checkpoint-1" / "state.pt"):
        assert path.stat().st_mode & 0o777 == folder_mode & 0o666, path


def test_earlier_run_needs_resume_or_overwrite(reference, tmp_path, data_dir, capsys):
    output = reference.start_from(2, tmp_path / "run")
    before = listing(output)
    code, err = cli(argv_of(resumable(output, data_dir)), capsys)
    assert code == 2 and "already holds a fine-tuning run" in err and "--resume" in err and "--overwrite" in err
    assert listing(output) == before


def test_state_loads_with_weights_only(reference):
    state = load_state(reference.output / "checkpoint-6")
    assert state["step"] == 6 and len(state["losses"]) == 6 and state["settings"]["batch_size"] == 4


# ---------------------------------------------------------- resuming, kills, signals


def assert_ends_like(reference: Reference, output: Path, summary: dict) -> None:
    """``output`` holds exactly the reference run's result: same weights bit for bit, same
    summary (but the timing), same final checkpoint, and no temporaries."""
    assert without_timing(summary) == without_timing(reference.summary)
    assert_same(model_weights(output), model_weights(reference.output))
    assert latest_checkpoint(output) == output / "checkpoint-6"
    assert_same(load_state(output / "checkpoint-6"), load_state(reference.output / "checkpoint-6"))
    assert not temporaries(output)


def test_resume_ends_where_an_uninterrupted_run_ends(reference, tmp_path, data_dir, capsys):
    output = tmp_path / "resumed"
    stopped = finetune(resumable(output, data_dir, max_steps=3))
    assert stopped["steps"] == 3 and latest_checkpoint(output) == output / "checkpoint-3"
    assert_same(load_state(output / "checkpoint-3"), load_state(reference.copies / "at-3" / "checkpoint-3"))
    capsys.readouterr()
    summary = finetune(resumable(output, data_dir, resume=True))
    assert f"resuming from {output / 'checkpoint-3'} at step 3/6" in capsys.readouterr().out
    assert_ends_like(reference, output, summary)
    assert finetune(resumable(output, data_dir, resume=True)) == summary  # finished: nothing to do
    folder_mode = ordinary_folder_mode(tmp_path)
    assert [p.stat().st_mode & 0o777 for p in (output, output / "checkpoint-6")] == [folder_mode] * 2


class Killed(BaseException):
    """The simulated death of the process: no `except Exception` may catch it."""


class KillSwitch:
    """Makes the ``point``-th file-system change inside the first call of a save function
    raise `Killed`, and every change after it too (a dead process changes nothing more)."""

    CHANGES = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (shutil, "rmtree"),
               (torch, "save")]
    CALLERS = {"save_checkpoint": loop_module, "publish_model": evaluation_module}  # the module that calls each save

    def __init__(self, patch: pytest.MonkeyPatch, save: str, point: int):
        self.point, self.count, self.armed, self.dead, self.done = point, 0, False, False, []
        for module, name in self.CHANGES:
            patch.setattr(module, name, self._guarded(getattr(module, name), name))
        original, calls = getattr(self.CALLERS[save], save), []

        def save_once(*args, **kwargs):
            calls.append(args)
            self.armed = len(calls) == 1
            try:
                return original(*args, **kwargs)
            finally:
                self.armed = False

        patch.setattr(self.CALLERS[save], save, save_once)

    def _guarded(self, function, name):
        def change(*args, **kwargs):
            if self.armed or self.dead:
                if self.dead or self.count == self.point:
                    self.dead = True
                    raise Killed(f"killed before {name}{args[:2]}")
                self.count += 1
                self.done.append((name, *[str(a) for a in args[:2]]))
            return function(*args, **kwargs)
        return change


def kill_points(save: str, run_once):
    """Run ``run_once(switch)`` with a kill at change 0, 1, 2, ... of ``save`` until a run
    passes every change; yields (point, switch) after each killed run."""
    for point in range(100):
        with pytest.MonkeyPatch.context() as patch:
            switch = KillSwitch(patch, save, point)
            try:
                run_once(switch)
            except Killed:
                pass
            else:
                assert point > 3, "a save takes several file-system changes"
                return
        assert switch.dead
        yield point, switch
    raise AssertionError("the save never finished")


def test_kill_at_every_point_of_a_checkpoint_swap(reference, tmp_path, data_dir, capsys):
    """Killed while publishing checkpoint-3 over checkpoint-2: --resume continues from the
    newest complete one and reaches the uninterrupted run's step-4 state bit for bit."""
    expected = load_state(reference.copies / "at-4" / "checkpoint-4")
    count = 0

    def run_once(switch):
        folder = reference.start_from(2, tmp_path / f"kill-{count}")
        finetune(resumable(folder, data_dir, resume=True, max_steps=4))

    for point, switch in kill_points("save_checkpoint", run_once):
        folder = tmp_path / f"kill-{count}"
        published = any(change[0] == "replace" and change[2].endswith("checkpoint-3") for change in switch.done)
        newest = 3 if published else 2
        assert latest_checkpoint(folder) == folder / f"checkpoint-{newest}", (point, switch.done)
        capsys.readouterr()
        finetune(resumable(folder, data_dir, resume=True, max_steps=4))
        assert f"resuming from {folder / f'checkpoint-{newest}'} at step {newest}/6" in capsys.readouterr().out
        assert [p.name for p in folder.iterdir()] == ["checkpoint-4"], point  # temporaries and older ones gone
        assert_same(load_state(folder / "checkpoint-4"), expected)
        count += 1
    assert count >= 6


def test_kill_at_every_point_of_the_final_save(reference, tmp_path, data_dir):
    """Killed while writing the final model beside the user's file: --resume ends with the
    uninterrupted run's model and summary, and the user's file is untouched."""
    count = 0

    def run_once(switch):
        folder = reference.start_from(6, tmp_path / f"kill-{count}")
        (folder / "notes.txt").write_text("the user's")
        finetune(resumable(folder, data_dir, resume=True))

    for point, switch in kill_points("publish_model", run_once):
        folder = tmp_path / f"kill-{count}"
        assert latest_checkpoint(folder) == folder / "checkpoint-6"
        summary = finetune(resumable(folder, data_dir, resume=True))
        assert_ends_like(reference, folder, summary)
        assert (folder / "notes.txt").read_text() == "the user's"
        count += 1
    assert count >= 6


SEND_SIGNAL_AT_STEP = """
import os, signal, sys
from torch.optim.optimizer import register_optimizer_step_pre_hook
from spec_stream.finetune import main
steps = []
def hook(optimizer, args, kwargs):
    steps.append(1)
    if len(steps) == int(sys.argv[2]):  # in the middle of that optimizer step
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
register_optimizer_step_pre_hook(hook)
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_saves_the_finished_step_and_exits(reference, tmp_path, data_dir, name, status):
    """A signal during step 5 (resumed from step 2: its 3rd step, no checkpoint due) saves
    checkpoint-5 once the step is done, and --resume ends like the uninterrupted run."""
    output = reference.start_from(2, tmp_path / "run")
    argv = argv_of(resumable(output, data_dir, resume=True))
    result = subprocess.run([sys.executable, "-c", SEND_SIGNAL_AT_STEP, name, "3", *argv], capture_output=True,
                            text=True, cwd=ROOT, timeout=600)
    assert result.returncode == status, result.stderr[-2000:]
    assert f"{name}: saved step 5 in {output}/checkpoint-5; continue with --resume" in result.stderr
    assert "Traceback" not in result.stderr
    assert latest_checkpoint(output) == output / "checkpoint-5" and load_state(output / "checkpoint-5")["step"] == 5
    if name == "SIGTERM":
        summary = finetune(resumable(output, data_dir, resume=True))
        assert_ends_like(reference, output, summary)


def test_bucketed_padded_batches_give_the_loss_of_unpadded_examples():
    """Length bucketing only changes how much padding a batch carries; the loss of a padded
    batch is the loss of its examples run one by one (sum over targets / their count)."""
    from spec_stream.training.batches import length_bucketed, make_batches
    from tests.helpers import tiny_model

    model = tiny_model(num_spec_streams=1, num_stream_layers=2).train()
    generator = torch.Generator().manual_seed(5)
    features = []
    for length in (7, 19, 12, 30, 9, 25):
        ids = torch.randint(1, 100, (length,), generator=generator).tolist()
        prompt = length // 2
        features.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    batches = length_bucketed(list(range(6)), [len(f["input_ids"]) for f in features], 3, generator)
    assert sorted(i for batch in batches for i in batch) == list(range(6))
    assert {tuple(sorted(b)) for b in batches} == {(0, 2, 4), (1, 3, 5)}  # short ones together
    # each loss term is a mean over its own targets: the main stream's (shift 1), the stream's (shift 2)
    for shift, weights in ((1, (1.0, 0.0)), (2, (0.0, 1.0))):
        model.config.main_loss_weight, model.config.stream_loss_weight = weights
        for rows in batches:
            padded = next(make_batches(features, rows, 3, pad_id=0))
            alone = [next(make_batches(features, [i], 1, pad_id=0)) for i in rows]
            counts = [int((a["labels"][:, shift:] != -100).sum()) for a in alone]
            total = sum(model(**a, loss_only=True).loss * n for a, n in zip(alone, counts))
            torch.testing.assert_close(model(**padded, loss_only=True).loss, total / sum(counts), atol=1e-5, rtol=0)


@pytest.mark.trains
def test_frozen_base_streams_learn_with_adapters_and_decode_like_the_original(finetuned_checkpoint, tmp_path,
                                                                              data_dir):
    """--freeze-base trains the streams' adapters (and embeddings): the base stays bit for
    bit, the streams get clearly better than without adapters on the same data, and the
    result decodes exactly like upstream greedy decoding of the original checkpoint."""
    base, _ = finetuned_checkpoint
    runs = {}
    for rank in (0, 16):
        runs[rank] = finetune(FinetuneConfig(
            dataset="e2e_nlg", output=str(tmp_path / f"rank{rank}"), data_dir=str(data_dir), base=str(base),
            freeze_base=True, stream_adapter_rank=rank, max_train_samples=300, max_eval_samples=40, epochs=4,
            batch_size=16, max_length=128, lr=1e-2, stream_loss_weight=1.0))
    before, after = model_weights(base), model_weights(tmp_path / "rank16")
    assert all(torch.equal(before[k], after[k]) for k in before if "transformer.streams." not in k)
    assert any(".adapters." in k for k in after)
    # same validation rows: adapters lower the (stream-weighted) loss and raise stream-1 accuracy (4 epochs at
    # 1e-2: at 2 epochs and 3e-3 the adapters on a base trained without the old pruning adapter gained 0.08 of loss)
    assert runs[16]["eval_loss"] < runs[0]["eval_loss"] - 0.1
    assert runs[16]["stream_accuracy"][0] > runs[0]["stream_accuracy"][0] + 0.03
    frozen = GPTNeoForCausalLM.from_pretrained(tmp_path / "rank16")
    original = transformers.GPTNeoForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    for example in load_examples("e2e_nlg", "test", data_dir, limit=15):
        ids = tokenizer(example.prompt, return_tensors="pt").input_ids
        out = frozen.generate(ids, speculative_streaming=True, max_new_tokens=24, eos_token_id=None)
        assert torch.equal(out, original.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=None,
                                                  pad_token_id=0))
