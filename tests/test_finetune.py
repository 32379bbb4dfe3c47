"""Fine-tuning on real rows of E2E-NLG with a tiny from-scratch model (CPU)."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from spec_stream import GPTNeoForCausalLM
from spec_stream.finetune import build_parser, finetune

SMALL = ["--dataset", "e2e_nlg", "--max-eval-samples", "30", "--batch-size", "8", "--max-length", "128", "--seed", "3"]


def run(tmp, data_dir, *extra):
    model = [] if "--base" in extra else ["--from-scratch", "tiny"]
    return finetune(build_parser().parse_args([*SMALL, *model, "--output", str(tmp), "--data-dir", str(data_dir), *extra]))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    output = tmp_path_factory.mktemp("run") / "e2e"
    summary = run(output, data_dir, "--max-train-samples", "500", "--epochs", "5", "--lr", "2e-3", "--train-pruner")
    return output, summary


def test_training_lowers_loss_and_streams_beat_unigram(trained):
    output, summary = trained
    print(f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; stream-1 accuracy "
          f"{summary['stream_accuracy'][0]:.3f} vs unigram baseline {summary['unigram_accuracy']:.3f}; "
          f"main accuracy {summary['main_accuracy']:.3f}")
    assert summary["final_loss"] < summary["first_loss"] - 2.0
    assert summary["stream_accuracy"][0] > summary["unigram_accuracy"] + 0.03


def test_final_checkpoint_loads_and_names_its_splits(trained):
    output, _ = trained
    model = GPTNeoForCausalLM.from_pretrained(output)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert model.config.num_spec_streams == 3 and tokenizer.eos_token_id is not None
    saved = json.loads((output / "training_args.json").read_text())
    assert saved["summary"]["train_split"] == "e2e_nlg/train"
    assert saved["summary"]["eval_split"] == "e2e_nlg/validation"


def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, data_dir):
    args = ("--max-train-samples", "64", "--epochs", "2", "--save-every", "3")
    straight = run(tmp_path / "straight", data_dir, *args)
    stopped = run(tmp_path / "resumed", data_dir, *args, "--max-steps", "5")
    assert stopped["steps"] == 5
    resumed = run(tmp_path / "resumed", data_dir, *args, "--resume")
    assert resumed["steps"] == straight["steps"] == 16
    assert resumed["final_loss"] == pytest.approx(straight["final_loss"], abs=1e-5)
    a = GPTNeoForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = GPTNeoForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_freeze_base_keeps_every_main_stream_weight(tmp_path, data_dir):
    base = tmp_path / "base"
    run(base, data_dir, "--max-train-samples", "32", "--epochs", "1")
    run(tmp_path / "frozen", data_dir, "--max-train-samples", "32", "--epochs", "1", "--freeze-base",
        "--base", str(base))
    before = GPTNeoForCausalLM.from_pretrained(base).state_dict()
    after = GPTNeoForCausalLM.from_pretrained(tmp_path / "frozen").state_dict()
    streams = [k for k in before if "transformer.streams." in k]
    assert streams and all(torch.equal(before[k], after[k]) for k in before if k not in streams)
    assert not torch.equal(before["transformer.streams.embeddings"], after["transformer.streams.embeddings"])


def test_lora_run_saves_a_plain_model(tmp_path, data_dir):
    run(tmp_path / "lora", data_dir, "--max-train-samples", "32", "--epochs", "1", "--lora-rank", "4")
    model = GPTNeoForCausalLM.from_pretrained(tmp_path / "lora")
    assert not any("lora" in k for k in model.state_dict())


@pytest.mark.parametrize("args, words", [
    (["--dataset", "squad"], "unknown task"),
    (["--dataset", "e2e_nlg", "--from-scratch", "huge"], "--from-scratch"),
    (["--dataset", "e2e_nlg", "--from-scratch", "tiny", "--base", "x"], "exclude"),
    (["--dataset", "e2e_nlg", "--epochs", "0"], "--epochs"),
    (["--dataset", "e2e_nlg", "--num-stream-layers", "9", "--max-train-samples", "8"], "num_stream_layers"),
    (["--dataset", "e2e_nlg", "--data-dir", "/nonexistent"], "/nonexistent"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, data_dir, args, words):
    if "--data-dir" not in args:
        args = [*args, "--data-dir", str(data_dir)]
    result = subprocess.run([sys.executable, "-m", "spec_stream.finetune", *args, "--output", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
