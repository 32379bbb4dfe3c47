"""dataset_tps.py end to end on the CPU: a tiny fine-tuned checkpoint, 3 samples per dataset."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import dataset_tps
from spec_stream.finetune import build_parser, finetune

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["naive", "half", "flash_attention2", "prompt_lookup", "static", "spec_stream"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, data_dir):
    """One tiny checkpoint fine-tuned briefly on E2E-NLG, used for every dataset."""
    output = tmp_path_factory.mktemp("ckpt") / "tiny"
    finetune(build_parser().parse_args([
        "--dataset", "e2e_nlg", "--output", str(output), "--from-scratch", "tiny", "--data-dir", str(data_dir),
        "--max-train-samples", "200", "--max-eval-samples", "20", "--epochs", "1",
    ]))
    return output


@pytest.fixture(scope="module")
def report(tiny_checkpoint, data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("results") / "report.json"
    code = dataset_tps.main([
        "--model_type", ",".join(ENGINES), "--dataset", "all", "--model", str(tiny_checkpoint),
        "--data-dir", str(data_dir), "--num-samples", "3", "--max-new-tokens", "16", "--device", "cpu",
        "--output", str(output),
    ])
    assert code == 0
    return json.loads(output.read_text())


def test_every_engine_and_dataset_is_measured(report):
    pairs = {(r["engine"], r["dataset"]) for r in report["results"]}
    assert pairs == {(e, d) for e in ENGINES for d in ("spider", "dialogsum", "e2e_nlg")}
    assert report["machine"]["torch"] and report["machine"]["transformers"]


def test_figures_are_positive_and_consistent(report):
    for row in report["results"]:
        assert row["samples"] == 3 and row["new_tokens"] > 0 and row["seconds"] > 0
        assert math.isclose(row["new_tokens"], row["tokens_per_second"] * row["seconds"], rel_tol=1e-6)
        assert math.isclose(row["tokens_per_call"], row["new_tokens"] / row["forward_calls"], rel_tol=1e-6)
        assert row["peak_memory_mb"] > 0 and row["speedup_vs_naive"] > 0
        copy_rate = report["machine"]["copy_gb_per_second"]
        assert math.isclose(row["bandwidth_share"], row["weight_gb_per_second"] / copy_rate, rel_tol=1e-6)
        assert 0 < row["bandwidth_share"] < 1
        assert row["quality"] and all(v >= 0 for v in row["quality"].values())
        if row["engine"] in ("naive", "half", "flash_attention2", "static"):
            assert row["tokens_per_call"] == 1.0, row  # one token per forward call, no speculation
    spec = [r for r in report["results"] if r["engine"] == "spec_stream"]
    for row in spec:
        assert set(row["step_seconds"]) >= {"prefill", "draft", "forward", "verify"}
        assert 0 <= row["acceptance_rate"] <= 1


def test_spec_stream_and_static_outputs_identical_to_naive(report):
    for row in report["results"]:
        if row["engine"] in ("spec_stream", "static", "prompt_lookup"):  # all fp32 on the CPU
            assert row["identical_to_naive"] == 1.0, row


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "dataset_tps.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, words", [
    (["--model_type", "fastest"], "unknown --model_type"),
    (["--dataset", "squad"], "unknown --dataset"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_bad_input_is_one_line_exit_2(args, words):
    result = run_cli(*args)
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_without_streams_is_refused(tmp_path, data_dir):
    from tests.helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "plain")  # num_spec_streams = 0
    result = run_cli("--model", str(tmp_path / "plain"), "--dataset", "e2e_nlg", "--data-dir", str(data_dir))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "stream" in result.stderr and "spec_stream.finetune" in result.stderr


def test_unreachable_hub_without_data_dir(tiny_checkpoint, monkeypatch):
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "dataset_tps.py"), "--model", str(tiny_checkpoint), "--dataset", "e2e_nlg",
         "--num-samples", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**env, "HOME": str(Path.home())},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--data-dir" in result.stderr
