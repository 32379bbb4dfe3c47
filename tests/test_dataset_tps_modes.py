"""dataset_tps.py's modes on the session's tiny checkpoint: sampling with its distribution
check (which a deliberately wrong engine fails), a batch sweep (engines that cannot batch
say so), and a reference model (a frozen-base fine-tuned copy against its original)."""
import json
import shutil
from pathlib import Path

import pytest
import transformers

import dataset_tps
from spec_stream.engines import ENGINES, NaiveEngine
from spec_stream.finetune import finetune
from spec_stream.training.config import FinetuneConfig
from tests.test_dataset_tps import check_documented, refused

TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def checkpoint(finetuned_checkpoint) -> Path:
    """The session's tiny checkpoint fine-tuned on E2E-NLG."""
    return Path(finetuned_checkpoint[0])


class TooColdEngine(NaiveEngine):
    """naive sampling at half the asked temperature: a wrong sampler the check must catch."""

    name = "too_cold"

    def decoding(self):
        return {**super().decoding(), "temperature": self.sampling.temperature / 2}


def run(checkpoint, data_dir, output, *extra) -> dict:
    """A benchmark run on a tiny checkpoint with a fixed tree (on this CPU "auto" would pick
    none for it, and these tests need drafts)."""
    assert dataset_tps.main(["--model", str(checkpoint), "--dataset", "e2e_nlg", "--data-dir", str(data_dir),
                             "--max-new-tokens", "16", "--repeats", "1", "--device", "cpu", "--output", str(output),
                             "--tree-widths", "4,3,2", *extra]) == 0
    return json.loads(Path(output).read_text())


@pytest.fixture(scope="module")
def sampled(checkpoint, data_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENGINES, TooColdEngine.name, TooColdEngine)
        patch.setattr(dataset_tps, "ENGINE_NAMES", tuple(ENGINES))
        return run(checkpoint, data_dir, tmp_path_factory.mktemp("sampled") / "r.json", "--num-samples", "16",
                   "--model_type", "naive,static,spec_stream,too_cold", "--do-sample", "--temperature",
                   str(TEMPERATURE), "--top-k", "40", "--seed", "7")


def test_sampling_rows_report_speed_calls_and_acceptance(sampled):
    rows = {row["engine"]: row for row in sampled["results"]}
    assert set(rows) == {"naive", "static", "spec_stream", "too_cold"} and sampled["skipped"] == []
    settings = sampled["settings"]
    assert (settings["do_sample"], settings["temperature"], settings["top_k"], settings["top_p"],
            settings["seed"]) == (True, TEMPERATURE, 40, 1.0, 7)
    for row in rows.values():
        assert row["identical_to_greedy"] is None and row["tokens_per_second"] > 0
        assert row["repeats_agree"] is True  # one seed per prompt: a pass is reproducible
    assert rows["spec_stream"]["tokens_per_call"] > 1.05 and 0 < rows["spec_stream"]["acceptance_rate"] <= 1
    assert rows["static"]["tokens_per_call"] == 1.0
    assert rows["naive"]["identical_to_naive"] == 1.0
    check_documented(sampled)


def test_correct_samplers_pass_the_distribution_check(sampled):
    for row in sampled["results"]:
        check = row["distribution_check"]
        if row["engine"] != "too_cold":
            assert check["passed"] and check["p_value"] >= check["level"] == 1e-3, row["engine"]
            assert check["tokens_outside_support"] == 0
    naive = next(r for r in sampled["results"] if r["engine"] == "naive")["distribution_check"]
    assert naive["statistic"] == 0.0 and naive["mean_log_prob"] == naive["reference_mean_log_prob"]


def test_a_sampler_at_the_wrong_temperature_fails_it(sampled):
    check = next(r for r in sampled["results"] if r["engine"] == "too_cold")["distribution_check"]
    assert not check["passed"] and check["p_value"] < check["level"]
    assert check["statistic"] > 0 and check["mean_log_prob"] > check["reference_mean_log_prob"]  # too likely


def test_table_shows_the_check(sampled, capsys):
    from rich.console import Console

    settings = dataset_tps.parse_settings(["--dataset", "e2e_nlg", "--device", "cpu", "--do-sample", "--wide"])
    dataset_tps.print_table(sampled["results"], [], Console(width=400), settings)
    table = capsys.readouterr().out
    assert "FAIL z=+" in table and "pass z=" in table and "distribution check" in table


# ---------------------------------------------------------------- batch sweep


@pytest.fixture(scope="module")
def sweep(checkpoint, data_dir, tmp_path_factory):
    return run(checkpoint, data_dir, tmp_path_factory.mktemp("sweep") / "r.json", "--num-samples", "4",
               "--model_type", "naive,prompt_lookup,spec_stream", "--batch-size", "2,1")


def test_every_engine_runs_at_every_batch_size_or_says_why(sweep):
    assert sweep["settings"]["batch_sizes"] == [1, 2]
    measured = {(r["engine"], r["batch_size"]) for r in sweep["results"]}
    skipped = {(s["engine"], s["batch_size"]): s["reason"] for s in sweep["skipped"]}
    assert {("naive", 1), ("naive", 2), ("prompt_lookup", 1), ("spec_stream", 1)} <= measured
    assert "one prompt at a time" in skipped[("prompt_lookup", 2)]
    assert (("spec_stream", 2) in measured) != (("spec_stream", 2) in skipped)  # refused until generate batches
    for row in sweep["results"]:
        assert row["identical_to_greedy"] == 1.0 and row["identical_to_naive"] == 1.0, row  # batch-1 greedy
    check_documented(sweep)


def test_each_batch_size_is_settled_before_its_warm_up():
    """`measure` tells the engine the batch size (where "auto" picks its tree) before any
    call at that size, the untimed warm-up included."""
    from types import SimpleNamespace

    import torch
    from spec_stream.benchmark.measure import measure

    class Recorder:
        device = torch.device("cpu")

        def __init__(self):
            self.settled, self.calls = None, []

        def use_batch_size(self, batch_size):
            self.settled = batch_size

        def run_many(self, ids, max_new_tokens, eos, batch_size):
            self.calls.append((batch_size, self.settled))
            return []

    engine, prompts = Recorder(), [SimpleNamespace(ids=torch.ones(1, 3, dtype=torch.long))] * 4
    for batch_size in (2, 1, 4):
        measure(engine, prompts, SimpleNamespace(repeats=2, max_new_tokens=3), 0, batch_size, "label")
    assert engine.calls and all(size == settled for size, settled in engine.calls)
    assert [size for size, _ in engine.calls] == [2] * 3 + [1] * 3 + [4] * 3  # warm-up + 2 passes each


def test_throughput_and_latency_per_batch(sweep):
    for row in sweep["results"]:
        size, passes = row["batch_size"], row["seconds_per_repeat"]
        # every prompt waits for its whole batch: 2 full batches of 2 make the mean latency a pass's seconds / 2
        assert row["latency_seconds_per_repeat"] == pytest.approx([s * size / 4 for s in passes], rel=1e-9)
        assert row["tokens_per_second"] == pytest.approx(row["new_tokens"] / passes[0], rel=1e-9)
        if row["engine"] == "naive":
            assert row["speedup_vs_naive"] == 1.0  # against naive at the same batch size
    naive = {r["batch_size"]: r for r in sweep["results"] if r["engine"] == "naive"}
    assert naive[2]["tokens_per_call"] > naive[1]["tokens_per_call"] == 1.0  # a batched call serves 2 rows


def test_throughput_plot_against_batch_size(sweep, tmp_path):
    import sys

    scripts = str(Path(dataset_tps.__file__).resolve().parent / "scripts")
    sys.path.insert(0, scripts)
    try:
        import plot_results
    finally:
        sys.path.remove(scripts)
    (tmp_path / "r.json").write_text(json.dumps(sweep))
    assert plot_results.main([str(tmp_path / "r.json"), "--out", str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "throughput_vs_batch.png").stat().st_size > 0


# ---------------------------------------------------------------- reference model


@pytest.fixture(scope="module")
def original(checkpoint, tmp_path_factory) -> Path:
    """The checkpoint as plain GPT-Neo: saved through upstream transformers, with its tokenizer."""
    folder = tmp_path_factory.mktemp("original") / "plain"
    transformers.GPTNeoForCausalLM.from_pretrained(checkpoint).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder)
    return folder


def test_frozen_base_checkpoint_decodes_as_its_original(checkpoint, original, data_dir, tmp_path):
    frozen = tmp_path / "frozen"
    finetune(FinetuneConfig(dataset="e2e_nlg", output=str(frozen), data_dir=str(data_dir), base=str(checkpoint),
                            freeze_base=True, max_train_samples=16, max_eval_samples=4, batch_size=8, max_length=128))
    report = run(frozen, data_dir, tmp_path / "r.json", "--num-samples", "6", "--model_type", "naive,spec_stream",
                 "--reference-model", str(original))
    assert report["settings"]["reference_model"] == str(original)
    rows = {row["engine"]: row for row in report["results"]}
    assert rows["spec_stream"]["identical_to_naive"] == 1.0 and rows["spec_stream"]["identical_to_greedy"] == 1.0
    assert rows["spec_stream"]["tokens_per_call"] > 1.0


def test_reference_with_another_vocabulary_is_refused(checkpoint, original, data_dir, tmp_path, capsys, no_engine):
    from tests.helpers import tiny_model

    small = tmp_path / "small-vocab"
    tiny_model().save_pretrained(small)  # vocab_size 101
    shutil.copy(original / "tokenizer.json", small)
    shutil.copy(original / "tokenizer_config.json", small)
    message = refused(["--model", str(checkpoint), "--reference-model", str(small), "--dataset", "e2e_nlg",
                       "--data-dir", str(data_dir), "--output", str(tmp_path / "r.json")], capsys)
    assert "vocab_size 101" in message and "fine-tuned from" in message


def test_reference_with_another_tokenizer_is_refused(checkpoint, original, data_dir, tmp_path, capsys, no_engine):
    from spec_stream.tokenization import train_tokenizer

    other = tmp_path / "other-tokenizer"
    shutil.copytree(original, other)
    train_tokenizer(["select name from singer where age > 30"] * 50, 300).save_pretrained(other)
    message = refused(["--model", str(checkpoint), "--reference-model", str(other), "--dataset", "e2e_nlg",
                       "--data-dir", str(data_dir), "--output", str(tmp_path / "r.json")], capsys)
    assert "another tokenizer" in message and list(tmp_path.glob("*.json")) == []
