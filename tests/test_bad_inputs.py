"""Every bad input of the command lines refused at the boundary, before any work: one line
``error: ...`` naming the value, what is wrong and the fix, exit status 2, no traceback; and
no result file replaced unasked. A tiny untrained checkpoint made here stands in for a
fine-tuned one (the checks run before any engine or training step)."""
import importlib.util
import json
import math
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

import dataset_tps
from huggingface.transformers.generation.speculative_tree import TREE_NODE_LIMIT, TreeSpec
from spec_stream.arithmetic import main as arithmetic_main
from spec_stream.benchmark.inputs import prepare_task
from spec_stream.checkpoints import TRAINING_ARGS, build_from_scratch, load_for_inference, write_problem
from spec_stream.data import resolve_dataset
from spec_stream.finetune import main as finetune_main
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]
TASKS_AS_READY = dataset_tps.tasks_as_ready
WORDS = ["soup", "bread", "fish", "rice", "tea", "cake", "pie", "jam"]


def refused(main, argv, capsys) -> str:
    """The one-line error of a command line that must exit 2 without a traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    last = (err.strip().splitlines() or [""])[-1]
    assert exit_info.value.code == 2 and "error: " in last and "Traceback" not in err, err
    return last


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def no_work(monkeypatch, no_engine):
    """Fails a test if a command line starts its work (a benchmark's checkpoints and
    prompts, a fine-tuning's output folder, a script's timing) before refusing."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(dataset_tps, "tasks_as_ready", refuse)
    monkeypatch.setattr("spec_stream.finetune.prepare_output", refuse)
    return refuse


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny from-scratch model with 3 streams, saved as fine-tuning saves one."""
    folder = tmp_path_factory.mktemp("bad-inputs") / "tiny"
    texts = [f"Describe the restaurant: name[{a}], food[{b}]\nDescription: {a} serves {b}."
             for a in WORDS for b in WORDS]
    model, tokenizer = build_from_scratch("tiny", texts, 3, None, "e2e_nlg")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / TRAINING_ARGS).write_text("{}")
    return folder


def with_config(checkpoint: Path, folder: Path, **changes) -> Path:
    """A copy of ``checkpoint`` whose config.json has ``changes`` (a value None: the key removed)."""
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def benchmark_argv(model, data_dir, output, *extra) -> list:
    return ["--model_type", "spec_stream", "--dataset", "e2e_nlg", "--data-dir", data_dir, "--model", model,
            "--repeats", "1", "--max-new-tokens", "8", "--num-samples", "2", "--output", output, *extra]


def finetune_argv(data_dir, output, *extra) -> list:
    return ["--data-dir", data_dir, "--max-train-samples", "16", "--max-eval-samples", "4", "--batch-size", "4",
            "--output", output, *extra]


# ---------------------------------------------------------------- 1. tree size


def test_a_tree_past_the_node_limit_is_refused_when_made():
    with pytest.raises(ValueError, match=f"more than {TREE_NODE_LIMIT} nodes"):
        TreeSpec((100, 100, 100))
    with pytest.raises(ValueError, match=f"more than {TREE_NODE_LIMIT} nodes"):
        TreeSpec((10**9,) * 10_000)  # refused at once, without multiplying the widths out
    assert TreeSpec((4, 3, 2), lookup_length=8).size == 1 + 4 + 12 + 24 + 8


@pytest.mark.parametrize("flags", [["--tree-widths", "100,100,100"],
                                   ["--tree-widths", "8,8,7", "--lookup-branch", "4000", "--max-new-tokens", "4000"]])
def test_the_benchmark_bounds_the_tree_in_its_argument_check(flags, tmp_path):
    with pytest.raises(dataset_tps.UserError, match=f"--tree-widths.*more than {TREE_NODE_LIMIT} nodes"):
        dataset_tps.parse_settings(["--device", "cpu", "--output", str(tmp_path / "r.json"), *flags])


# ---------------------------------------------------------------- 2, 3. empty prompts


@pytest.fixture
def empty_prompts(tmp_path) -> list:
    path = write_jsonl(tmp_path / "empty.jsonl", [{"q": "", "a": "hello"}] * 6)
    return ["--dataset", path, "--prompt-template", "{q}", "--response-field", "a"]


def test_the_benchmark_refuses_an_empty_prompt_naming_its_row(empty_prompts, checkpoint, tmp_path, capsys,
                                                              no_engine):
    argv = ["--model", checkpoint, "--repeats", "1", "--max-new-tokens", "8", "--num-samples", "2",
            "--output", tmp_path / "r.json", *empty_prompts]
    message = refused(dataset_tps.main, argv, capsys)
    assert "empty.jsonl row" in message and "empty prompt" in message and "column q" in message
    assert not (tmp_path / "r.json").exists()


def test_fine_tuning_refuses_an_empty_prompt_naming_its_row(empty_prompts, tmp_path, capsys):
    output = tmp_path / "out"
    message = refused(finetune_main, ["--from-scratch", "tiny", "--output", output, *empty_prompts], capsys)
    assert "empty.jsonl row" in message and "empty prompt" in message and not output.exists()


def test_the_loss_takes_a_sequence_shorter_than_the_streams_reach():
    """Two tokens, three streams: the streams have no target, the main stream one."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2).train()
    ids = torch.tensor([[5, 6]])
    loss = model(ids, labels=torch.tensor([[-100, 6]]), loss_only=True).loss  # as fine-tuning calls it
    assert math.isfinite(loss.item())


# ---------------------------------------------------------------- 4, 5, 6. fine-tuning inputs


def test_fine_tuning_refuses_a_max_length_below_two(data_dir, tmp_path, capsys):
    output = tmp_path / "out"
    message = refused(finetune_main, finetune_argv(data_dir, output, "--dataset", "e2e_nlg", "--from-scratch", "tiny",
                                                   "--max-length", "1"), capsys)
    assert "--max-length 1" in message and "pass 2 or more" in message and not output.exists()


def test_fine_tuning_refuses_an_output_it_cannot_write(data_dir, capsys):
    if not Path("/sys").is_dir() or write_problem(Path("/sys")) is None:
        pytest.skip("needs /sys, which refuses new files even to root")
    message = refused(finetune_main, finetune_argv(data_dir, "/sys/ftx", "--dataset", "e2e_nlg"), capsys)
    assert "--output /sys/ftx: cannot write in /sys" in message


def test_fine_tuning_refuses_a_truncated_base(checkpoint, data_dir, tmp_path, capsys):
    damaged = shutil.copytree(checkpoint, tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    output = tmp_path / "out"
    message = refused(finetune_main, finetune_argv(data_dir, output, "--dataset", "e2e_nlg", "--base", damaged),
                      capsys)
    assert f"{weights} is truncated or damaged" in message and not output.exists()


def test_fine_tuning_refuses_a_stream_count_other_than_the_bases(checkpoint, data_dir, tmp_path, capsys):
    output = tmp_path / "out"
    message = refused(finetune_main, finetune_argv(data_dir, output, "--dataset", "e2e_nlg", "--base", checkpoint,
                                                   "--num-spec-streams", "5"), capsys)
    assert "--num-spec-streams 5" in message and "holds 3 trained" in message and not output.exists()


def test_a_damaged_tokenizer_is_refused_by_both_command_lines(checkpoint, data_dir, tmp_path, capsys, no_engine):
    damaged = shutil.copytree(checkpoint, tmp_path / "damaged")
    (damaged / "tokenizer.json").write_text('{"version": "1.0"}')  # valid JSON, not a tokenizer
    message = refused(dataset_tps.main, benchmark_argv(damaged, data_dir, tmp_path / "r.json"), capsys)
    assert f"cannot load the tokenizer of {damaged}" in message
    output = tmp_path / "out"
    message = refused(finetune_main, finetune_argv(data_dir, output, "--dataset", "e2e_nlg", "--base", damaged),
                      capsys)
    assert f"cannot load the tokenizer of {damaged}" in message and not output.exists()


# ---------------------------------------------------------------- 7, 10. config against weights


def test_the_benchmark_refuses_a_config_with_more_streams_than_the_weights(checkpoint, data_dir, tmp_path, capsys,
                                                                           no_engine):
    five = with_config(checkpoint, tmp_path / "five", num_spec_streams=5)
    message = refused(dataset_tps.main, benchmark_argv(five, data_dir, tmp_path / "r.json"), capsys)
    assert "num_spec_streams=5" in message and "hold 3 speculative streams" in message


@pytest.mark.parametrize("streams", [0, None], ids=["zero", "missing"])
def test_stream_weights_the_config_does_not_describe_are_an_error(streams, checkpoint, data_dir, tmp_path, capsys,
                                                                  no_engine):
    folder = with_config(checkpoint, tmp_path / "config", num_spec_streams=streams)
    with pytest.raises(ValueError, match="num_spec_streams=0 but its weights hold 3"):
        load_for_inference(str(folder))
    message = refused(dataset_tps.main, benchmark_argv(folder, data_dir, tmp_path / "r.json"), capsys)
    assert '"num_spec_streams": 3' in message and "has no speculative stream weights" not in message


# ---------------------------------------------------------------- 9. an existing result


def test_an_existing_benchmark_report_is_kept_unless_overwrite(tmp_path, capsys, no_work):
    report = tmp_path / "results.json"
    report.write_text("mine")
    message = refused(dataset_tps.main, ["--device", "cpu", "--output", report], capsys)
    assert f"--output {report} already exists" in message and "--overwrite" in message
    assert report.read_text() == "mine"
    dataset_tps.check_output(report, overwrite=True)  # asked: allowed


# ---------------------------------------------------------------- 11. prompts past the context


def test_prompts_past_the_context_are_warned_about_before_timing_and_counted(checkpoint, tmp_path, capsys):
    long = " ".join(WORDS * 200)  # 1600 words, past the tiny model's 1024 positions
    path = write_jsonl(tmp_path / "long.jsonl", [{"q": long, "a": "soup"}] * 6)
    settings = dataset_tps.parse_settings(["--dataset", str(path), "--prompt-template", "{q}", "--response-field", "a",
                                           "--model", str(checkpoint), "--max-new-tokens", "8", "--device", "cpu",
                                           "--output", str(tmp_path / "r.json")])
    capsys.readouterr()
    task = prepare_task(resolve_dataset(str(path), "{q}", "a"), str(checkpoint), settings)
    warning = capsys.readouterr().err
    assert "warning: 1 of 1" in warning and "1016 tokens" in warning and "'cut' column" in warning
    assert task.prompts[0].truncated and task.prompts[0].ids.shape[1] == 1016
    row = {"dataset": "long", "engine": "naive", "batch_size": 1, "truncated_prompts": 1, "backend": "eager",
           "tokens_per_second": 10.0, "tokens_per_second_spread": {"min": 9.0, "max": 11.0, "iqr": 1.0},
           "latency_seconds": 0.8, "predicted_ms_per_token": {"ms": 50.0, "bound": "memory"},
           "speedup_vs_naive": 1.0, "tokens_per_call": 1.0, "acceptance_rate": None, "identical_to_greedy": 1.0,
           "distribution_check": None, "identical_to_naive": 1.0, "bandwidth_share": 0.1, "quality": {},
           "repetition": 0.0, "peak_memory_mb": 1.0}
    assert dataset_tps.table_cells(row)[dataset_tps.COLUMNS.index("cut")] == "1"


# ---------------------------------------------------------------- every CLI, random bad values


def script(name: str, *work: str, refuse=None):
    """scripts/NAME.py as a module; its functions named in ``work`` replaced by ``refuse``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for function in work:
        setattr(module, function, refuse)
    return module


def bad_numbers(rng: random.Random, minimum: float, integer: bool = True) -> list:
    """Values below ``minimum``, not numbers, or not finite, as text."""
    below = [minimum - 1, minimum - rng.randint(2, 10**6), -(10**rng.randint(3, 30))]
    values = [str(int(v)) for v in below] + ["", "x", rng.choice(["1e", "--", "0x", "½"])]
    return values + (["1.5", "nan"] if integer else ["nan", "inf", "-inf"])


def bad_paths(rng: random.Random, flag: str) -> list:
    """Paths no file system takes: a NUL byte, a name or a whole path too long."""
    name = "".join(rng.choice("abcé") for _ in range(rng.randint(256, 400)))
    return [(flag, f"runs/a\0{rng.randint(0, 9)}"), (flag, name), (flag, "/".join(["ab"] * rng.randint(2100, 3000)))]


def bad_values(rng: random.Random) -> dict:
    """Per command line: (flag, bad value) pairs, the rest of its arguments valid."""
    numbers = lambda flag, minimum, integer=True: [(flag, v) for v in bad_numbers(rng, minimum, integer)]  # noqa: E731
    paths = lambda flag: bad_paths(rng, flag)  # noqa: E731
    return {
        "dataset_tps": [*numbers("--num-samples", 1), *numbers("--max-new-tokens", 1), *numbers("--repeats", 1),
                        *numbers("--lookup-branch", 0), ("--batch-size", "0,2"), ("--batch-size", "1,,x"),
                        ("--tree-widths", f"{rng.randint(40, 999)},{rng.randint(40, 999)},9"), ("--tree-widths", "-1"),
                        ("--tree-widths", "4;3"), ("--device", "tpu"), ("--half-dtype", "fp8"),
                        ("--model_type", "fastest"), ("--output", "/proc/x/r.json"), ("--output", "a\0b"),
                        ("--temperature", "0.5"), *[pair for flag in dataset_tps.PATH_FLAGS for pair in paths(flag)]],
        "sampling": [*numbers("--temperature", 1e-9, False), *numbers("--top-k", 0), *numbers("--seed", 0),
                     ("--seed", str(2**32 + rng.randint(0, 10**9))), ("--top-p", "1.5"), ("--top-p", "0")],
        "finetune": [*numbers("--batch-size", 1), *numbers("--max-length", 2), *numbers("--epochs", 1e-9, False),
                     *numbers("--lr", 1e-12, False), *numbers("--max-train-samples", 1), *numbers("--save-every", 1),
                     *numbers("--num-spec-streams", 0), *numbers("--lora-rank", 0), ("--warmup-ratio", "1"),
                     ("--warmup-ratio", "nan"), ("--main-loss-weight", "inf"), ("--seed", str(2**32)),
                     ("--seed", "-1"), ("--num-spec-streams", str(rng.randint(600, 10**6))),
                     ("--lora-rank", str(rng.randint(65, 10**6))), ("--mixed-precision", "fp8"),
                     ("--from-scratch", "huge"), ("--stream-targets", "all"), ("--peak-tflops", "nan"),
                     *paths("--output"), *paths("--data-dir"), *paths("--base"), *paths("--train-split")],
        "attention_bench": [*numbers("--repeats", 3), *numbers("--embedding", 1),
                            *numbers("--max-seconds", 1e-9, False),
                            ("--memory-share", "0.95"), ("--memory-share", "nan"), ("--tokens", "0,4"),
                            ("--methods", "flash9"), ("--dtype", "int3")],
        "step_costs": [*numbers("--steps", 1), *numbers("--prompt", 1), ("--trees", "(100,100,100)"),
                       ("--trees", "(0,)"), ("--trees", "x"), ("--runners", "jit"), *paths("--model")],
        "arithmetic": [*numbers("--batch", 1), *numbers("--context", 1), ("--dtype", "float7"), ("--device", "tpu"),
                       ("--json", "/proc/x.json")],
        "tokens_per_call": [*numbers("--num-samples", 1), *numbers("--max-new-tokens", 1), *paths("--original"),
                            ("--tree-widths", "auto"), ("--tree-widths", "300,300")],
    }


@pytest.mark.parametrize("seed", [35, 36, 37])
def test_random_bad_values_exit_2_in_one_line_on_every_command_line(seed, data_dir, tmp_path, capsys, no_work):
    rng = random.Random(seed)
    output = tmp_path / "out"
    valid = {
        "dataset_tps": (dataset_tps.main, ["--device", "cpu", "--output", output / "r.json"]),
        "sampling": (dataset_tps.main, ["--device", "cpu", "--do-sample", "--output", output / "r.json"]),
        "finetune": (finetune_main, ["--dataset", "e2e_nlg", "--data-dir", data_dir, "--output", output]),
        "attention_bench": (script("attention_bench", "run_sweep", refuse=no_work).main,
                            ["--device", "cpu", "--output", output]),
        "step_costs": (script("step_costs", "measure_machine", refuse=no_work).main,
                       ["--model", "tiny", "--output", output / "s.json"]),
        "arithmetic": (arithmetic_main, ["--model", "tiny", "--no-probe", "--json", output / "a.json"]),
        "tokens_per_call": (script("tokens_per_call_on_texts", "load_for_inference", refuse=no_work).main,
                            ["run", "--original", "run", "--dataset", "e2e_nlg"]),
    }
    cases = [(name, flag, value) for name, pairs in bad_values(rng).items() for flag, value in pairs]
    assert len(cases) > 150
    for name, flag, value in cases:
        main, argv = valid[name]
        message = refused(main, [*argv, flag, value], capsys)
        assert message, (name, flag, value)
    assert not output.exists()  # nothing made by any of them


def test_plot_results_refuses_bad_reports_and_folders(tmp_path, capsys):
    plot_results = script("plot_results")
    (tmp_path / "empty.json").write_text(json.dumps({"results": [], "settings": {"repeats": 1}}))
    (tmp_path / "one.json").write_text(json.dumps({"results": [{"tokens_per_second_spread": {}}],
                                                   "settings": {"repeats": 1}}))
    (tmp_path / "file").write_text("")
    for argv in ([tmp_path / "none.json"], [tmp_path / "file"], [tmp_path / "empty.json"],
                 [tmp_path / "one.json", "--out", tmp_path / "file" / "images"]):
        capsys.readouterr()
        assert plot_results.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["step_costs", "attention_bench", "arithmetic"])
def test_the_scripts_keep_an_existing_result_unless_overwrite(name, tmp_path, capsys, no_work):
    existing = {"step_costs": tmp_path / "s.json", "attention_bench": tmp_path / "attention_bench.json",
                "arithmetic": tmp_path / "a.json"}[name]
    existing.write_text("mine")
    argv = {"step_costs": ["--model", "tiny", "--output", existing],
            "attention_bench": ["--device", "cpu", "--output", tmp_path],
            "arithmetic": ["--model", "tiny", "--no-probe", "--json", existing]}[name]
    main = arithmetic_main if name == "arithmetic" else script(name, "run_sweep", "measure_machine",
                                                                refuse=no_work).main
    assert "--overwrite" in refused(main, argv, capsys)
    assert existing.read_text() == "mine"


def test_max_new_tokens_past_the_default_checkpoints_context_is_refused_before_preparing_one(data_dir, tmp_path,
                                                                                             capsys, no_work,
                                                                                             monkeypatch):
    monkeypatch.setattr(dataset_tps, "tasks_as_ready", TASKS_AS_READY)  # the real one, up to the preparation
    monkeypatch.setattr(dataset_tps, "default_checkpoint", no_work)
    argv = ["--device", "cpu", "--dataset", "e2e_nlg", "--data-dir", data_dir, "--max-new-tokens", "100000",
            "--checkpoint-dir", tmp_path / "checkpoints", "--output", tmp_path / "r.json"]
    assert "--max-new-tokens 100000 leaves no room for a prompt" in refused(dataset_tps.main, argv, capsys)


@pytest.mark.parametrize("ids, error, message", [
    (torch.zeros((1, 0), dtype=torch.long), ValueError, r"shape \(1, 0\)"),  # an empty prompt
    (torch.zeros((0, 4), dtype=torch.long), ValueError, r"shape \(0, 4\)"),  # no prompt at all
    (torch.tensor([3, 4, 5]), ValueError, r"shape \(3,\)"),  # one prompt without its batch dimension
    (torch.tensor([[3.0, 4.0]]), TypeError, "integer token ids"),
    ([[3, 4]], TypeError, "got list"),
    (torch.tensor([[3, -1]]), ValueError, "token id -1"),
    (torch.tensor([[3, 10_000]]), ValueError, "token id 10000"),
])
def test_generate_refuses_empty_and_malformed_ids_before_any_work(ids, error, message, monkeypatch):
    """`generate(speculative_streaming=True)`'s prompts are checked first: the empty prompt
    ended in an IndexError deep inside the first token's argmax."""
    from huggingface.transformers.generation import utils
    from tests.helpers import tiny_model

    model = tiny_model(num_spec_streams=2, num_stream_layers=2)
    monkeypatch.setattr(utils, "runner_for", lambda *args: pytest.fail("a runner was made"))
    with pytest.raises(error, match=message):
        model.generate(ids, speculative_streaming=True, tree_widths=(2,), max_new_tokens=4)
