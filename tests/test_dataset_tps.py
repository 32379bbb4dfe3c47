"""dataset_tps.py on the CPU: one tiny fine-tuned checkpoint, 3 samples per dataset, every
engine; and every bad input refused, in-process, before the first engine starts."""
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import dataset_tps

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ["naive", "no_cache", "half", "flash_attention2", "prompt_lookup", "static", "spec_stream"]  # one of each kind
DATASETS = ("spider", "dialogsum", "e2e_nlg")


@pytest.fixture(scope="module")
def checkpoint(finetuned_checkpoint) -> Path:
    """The session's tiny checkpoint fine-tuned on E2E-NLG, used for every dataset."""
    return Path(finetuned_checkpoint[0])


@pytest.fixture(scope="module")
def report(checkpoint, data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("results") / "report.json"
    code = dataset_tps.main([
        "--model_type", ",".join(ENGINES), "--dataset", "all", "--model", str(checkpoint),
        "--data-dir", str(data_dir), "--num-samples", "3", "--max-new-tokens", "16", "--device", "cpu",
        "--output", str(output), "--tree-widths", "4,3,2",  # drafts to check ("auto" may pick none on a CPU)
    ])
    assert code == 0
    assert [p.name for p in output.parent.iterdir()] == ["report.json"]  # no temporary left
    return json.loads(output.read_text())


def test_every_engine_and_dataset_is_measured(report):
    pairs = {(r["engine"], r["dataset"]) for r in report["results"]}
    assert pairs == {(e, d) for e in ENGINES for d in DATASETS}
    assert report["machine"]["torch"] and report["machine"]["transformers"]
    assert report["settings"]["repeats"] == 3 and report["settings"]["engines"][0] == "naive"


def test_figures_are_positive_and_consistent(report):
    copy_rate = report["machine"]["copy_gb_per_second"]
    for row in report["results"]:
        assert row["samples"] == 3 and row["new_tokens"] > 0 and row["seconds"] > 0
        assert math.isclose(row["new_tokens"], row["tokens_per_second"] * row["seconds"], rel_tol=1e-9)
        assert math.isclose(row["tokens_per_call"], row["new_tokens"] / row["forward_calls"], rel_tol=1e-9)
        assert row["peak_memory_mb"] > 0 and row["speedup_vs_naive"] > 0
        assert math.isclose(row["bandwidth_share"], row["weight_gb_per_second"] / copy_rate, rel_tol=1e-6)
        assert 0 < row["bandwidth_share"] < 1
        assert row["quality"] and all(v >= 0 for v in row["quality"].values())
        assert 0 <= row["repetition"] <= 1
        assert row["predicted_ms_per_token"]["ms"] > 0 and row["predicted_ms_per_token"]["bound"] in ("memory", "compute")
        assert len(row["call_seconds_by_step"]) >= 2 and min(row["call_seconds_by_step"]) > 0
        if row["engine"] in ("naive", "no_cache", "half", "flash_attention2", "static"):
            assert row["tokens_per_call"] == 1.0, row  # one token per forward call, no speculation
    for row in report["results"]:
        if row["engine"] == "spec_stream":
            assert set(row["step_seconds"]) >= {"prefill", "draft", "forward", "verify"}
            assert 0 <= row["acceptance_rate"] <= 1


def test_median_and_spread_come_from_the_per_prompt_records(report):
    for row in report["results"]:
        prompts = row["prompts"]
        assert len(prompts) == 3 and all(len(p["seconds"]) == 3 for p in prompts)
        assert sum(p["tokens"] for p in prompts) == row["new_tokens"]
        assert sum(p["forward_calls"] for p in prompts) == row["forward_calls"]
        passes = [sum(p["seconds"][r] for p in prompts) for r in range(3)]
        assert passes == pytest.approx(row["seconds_per_repeat"], rel=1e-12)
        rates = sorted(row["new_tokens"] / s for s in passes)
        spread = row["tokens_per_second_spread"]
        assert row["tokens_per_second"] == pytest.approx(statistics.median(rates), rel=1e-12)
        assert (spread["min"], spread["max"]) == pytest.approx((rates[0], rates[-1]), rel=1e-12)
        assert spread["min"] <= spread["q1"] <= row["tokens_per_second"] <= spread["q3"] <= spread["max"]
        assert spread["iqr"] == pytest.approx(spread["q3"] - spread["q1"])
        assert row["repeats_agree"] is True


def test_exact_engines_reproduce_greedy_decoding_of_their_own_model(report):
    for row in report["results"]:
        assert row["identical_to_greedy"] == 1.0, row
        assert row["engine"] != "half" or "float16" in row["greedy_reference"]
        if row["engine"] in ("spec_stream", "static", "prompt_lookup"):  # all fp32 on the CPU
            assert row["identical_to_naive"] == 1.0, row


def test_spec_stream_runs_each_datasets_lookup_branch(report):
    from spec_stream.defaults import LOOKUP_BRANCH

    for row in report["results"]:
        if row["engine"] == "spec_stream":
            assert row["lookup_branch"] == LOOKUP_BRANCH[row["dataset"]]
            assert ("lookup" in row["backend"]) == bool(LOOKUP_BRANCH[row["dataset"]])
        else:
            assert row["accepted_from_lookup"] == 0 and not row["lookup_branch"]  # 0 (static) or None


def test_spider_rows_report_sql_validity(report):
    for row in report["results"]:
        assert ("valid_sql" in row["quality"]) == (row["dataset"] == "spider")
        if row["dataset"] == "spider":
            assert 0 <= row["quality"]["valid_sql"] <= 1


def test_table_shows_median_spread_quality_and_repetition(report, capsys):
    from rich.console import Console

    settings = dataset_tps.parse_settings(["--dataset", "e2e_nlg", "--device", "cpu", "--wide"])
    dataset_tps.print_table(report["results"], [], Console(width=400), settings)
    table = capsys.readouterr().out
    row = report["results"][0]
    spread = row["tokens_per_second_spread"]
    assert f"{spread['min']:.1f}-{spread['max']:.1f} ({spread['iqr']:.1f})" in table
    assert "median of 3 timed passes" in table and "repeat 4-gram" in table and "valid_sql" in table


def test_plots_are_written(report, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import plot_results
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert plot_results.main([str(tmp_path / "report.json"), "--out", str(tmp_path / "images")]) == 0
    written = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert written == ["kv_cache.png", "speedup_vs_tokens_per_call.png", "step_breakdown.png", "tokens_per_second.png"]


# ---------------------------------------------------------------- bad input, in-process


def refused(argv, capsys) -> str:
    """Run dataset_tps.main in-process; assert exit 2 with a one-line error (after any log
    lines of the loading it did), and return that line."""
    with pytest.raises(SystemExit) as exit_info:
        dataset_tps.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and err.strip().endswith(errors[0]), err
    return errors[0]


@pytest.mark.parametrize("args, words", [
    (["--model_type", "fastest"], "unknown --model_type fastest"),
    (["--model_type", "naive,assisted"], "--draft-model"),
    (["--dataset", "squad"], "unknown --dataset"),
    (["--num-samples", "0"], "--num-samples 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--repeats", "0"], "--repeats 0"),
    (["--tree-widths", "0"], "at least 1"),
    (["--tree-widths", "4,3,0"], "at least 1"),
    (["--tree-widths", "four"], "comma-separated integers"),
    (["--device", "tpu"], "unknown --device"),
    (["--model_type", "naive,batched"], "--batch-size 1,4,16"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--batch-size", "1,two"], "comma-separated integers"),
    (["--do-sample", "--temperature", "0"], "--temperature 0.0: sampling needs a temperature above 0"),
    (["--do-sample", "--top-p", "1.5"], "--top-p 1.5"),
    (["--do-sample", "--top-k", "-1"], "--top-k -1"),
    (["--do-sample", "--seed", "-3"], "--seed -3"),
    (["--temperature", "0.5"], "--temperature sets sampling; add --do-sample"),
    (["--reference-model", "runs/base"], "pass --model CHECKPOINT too"),
    (["--lookup-branch", "-1"], "--lookup-branch -1"),
    (["--lookup-branch", "100000", "--max-new-tokens", "64"], "pass at most 64"),
])
def test_bad_arguments_exit_2_in_one_line(args, words, capsys, no_engine):
    assert words in refused(args, capsys)


def test_output_that_is_a_folder_is_refused(tmp_path, capsys, no_engine):
    message = refused(["--output", str(tmp_path)], capsys)
    assert "is a folder" in message and "dataset_tps.json" in message
    assert list(tmp_path.iterdir()) == []


def test_output_under_a_file_is_refused(tmp_path, capsys, no_engine):
    (tmp_path / "notes.txt").write_text("mine")
    message = refused(["--output", str(tmp_path / "notes.txt" / "sub" / "r.json")], capsys)
    assert f"lies under the file {tmp_path / 'notes.txt'}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_unwritable_output_is_refused():
    with pytest.raises(dataset_tps.UserError, match="cannot write in /proc"):
        dataset_tps.check_output(Path("/proc/spec-stream-results/report.json"))


def test_missing_model_paths_are_refused(tmp_path, capsys, data_dir, no_engine, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network here: fail fast
    for model in (str(tmp_path / "no" / "such"), "runs/none-here"):  # '/' in both: a path, or a hub id
        message = refused(["--model", model, "--dataset", "e2e_nlg", "--data-dir", str(data_dir),
                           "--output", str(tmp_path / "r.json")], capsys)
        assert model in message and "spec_stream.finetune" in message
    assert list(tmp_path.iterdir()) == []


def run_on(model, tmp_path, data_dir, *extra):
    return ["--model", str(model), "--dataset", "e2e_nlg", "--data-dir", str(data_dir), "--num-samples", "1",
            "--output", str(tmp_path / "r.json"), *extra]


def test_tree_deeper_than_the_streams_is_refused(checkpoint, tmp_path, capsys, data_dir, no_engine):
    message = refused(run_on(checkpoint, tmp_path, data_dir, "--tree-widths", "4,3,2,2"), capsys)
    assert "4 levels" in message and "3 speculative streams" in message and "e.g. 4,3,2" in message


def test_truncated_weights_are_refused(checkpoint, tmp_path, capsys, data_dir, no_engine):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = refused(run_on(damaged, tmp_path, data_dir, "--model_type", "naive"), capsys)
    assert f"{weights} is truncated or damaged" in message


def test_checkpoint_without_streams_is_refused(tmp_path, capsys, data_dir, no_engine):
    from tests.helpers import tiny_model

    tiny_model().save_pretrained(tmp_path / "plain")  # num_spec_streams = 0
    message = refused(run_on(tmp_path / "plain", tmp_path, data_dir), capsys)
    assert "num_spec_streams=0" in message and "spec_stream.finetune" in message


def test_streams_in_config_but_not_in_weights_are_refused(checkpoint, tmp_path, capsys, data_dir, no_engine,
                                                         monkeypatch):
    """A checkpoint saved through upstream GPT-Neo keeps the config but drops the streams."""
    import transformers

    upstream = transformers.GPTNeoForCausalLM.from_pretrained(checkpoint)
    saved = tmp_path / "upstream-saved"
    upstream.save_pretrained(saved)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "training_args.json"):
        if (checkpoint / name).is_file():
            shutil.copy(checkpoint / name, saved / name)
    message = refused(run_on(saved, tmp_path, data_dir), capsys)
    assert "lacks them" in message and "--base" in message
    monkeypatch.undo()  # engines may run now: the engines that need no streams accept the checkpoint
    assert dataset_tps.main(run_on(saved, tmp_path, data_dir, "--model_type", "naive", "--repeats", "1")) == 0


def test_hub_unreachable_without_data_dir_end_to_end(checkpoint, tmp_path):
    """The one subprocess check: a fresh interpreter, offline, exits 2 in one line."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    result = subprocess.run(
        [sys.executable, str(ROOT / "dataset_tps.py"), "--model", str(checkpoint), "--dataset", "e2e_nlg",
         "--num-samples", "1", "--output", str(tmp_path / "r.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--data-dir" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


def test_missing_draft_model_is_refused(checkpoint, tmp_path, capsys, data_dir, no_engine):
    draft = tmp_path / "no-draft"
    message = refused(run_on(checkpoint, tmp_path, data_dir, "--model_type", "assisted", "--draft-model", str(draft)),
                      capsys)
    assert f"{draft}: no such checkpoint folder" in message


def documented_schema() -> dict[str, dict[str, str]]:
    """docs/report.md's tables: section -> field -> type."""
    schema, section = {}, None
    for line in (ROOT / "docs" / "report.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].split(" ")[0]
            schema[section] = {}
        elif section and line.startswith("| ") and not line.startswith(("| field", "|---")):
            field, kind = [cell.strip() for cell in line.strip("|").split("|")][:2]
            schema[section][field] = kind
    return schema


def matches(value, kind: str) -> bool:
    if kind.endswith("?") and value is None:
        return True
    python = {"int": int, "float": (int, float), "str": str, "bool": bool, "list": list, "dict": dict}[kind.rstrip("?")]
    return isinstance(value, python) and (kind.rstrip("?") == "bool" or not isinstance(value, bool))


def test_report_follows_its_documented_schema(report):
    assert report["schema_version"] == 4
    check_documented(report)


def check_documented(report) -> None:
    """Every field of ``report`` documented with a matching type, every documented field present."""
    schema = documented_schema()
    optional = {"machine": {"gpu"}}  # documented fields that only some machines have
    checks = [r["distribution_check"] for r in report["results"] if r["distribution_check"]]
    for section, objects in (("report", [report]), ("machine", [report["machine"]]),
                             ("settings", [report["settings"]]), ("results[]", report["results"]),
                             ("skipped[]", report["skipped"]), ("distribution_check", checks)):
        documented = schema[section]
        for item in objects:
            assert set(item) - set(documented) == set(), f"{section}: undocumented fields"
            assert set(documented) - set(item) <= optional.get(section, set()), f"{section}: fields missing"
            for field, value in item.items():
                assert matches(value, documented[field]), (section, field, value)


def test_broken_plain_decoding_stops_the_run_before_timing(checkpoint, tmp_path, capsys, data_dir, no_engine,
                                                           monkeypatch):
    """A transformers release whose generate no longer hands our model its cache (simulated:
    the cache is dropped from every step's inputs) makes our plain decoding differ from
    upstream's: the benchmark says so and exits 2 before any engine is built or timed."""
    import transformers

    from spec_stream import GPTNeoForCausalLM

    original = GPTNeoForCausalLM.prepare_inputs_for_generation

    def without_cache(self, *args, **kwargs):
        inputs = original(self, *args, **kwargs)
        return {k: v for k, v in inputs.items() if k not in ("cache", "past_key_values")}

    monkeypatch.setattr(GPTNeoForCausalLM, "prepare_inputs_for_generation", without_cache)
    message = refused(run_on(checkpoint, tmp_path, data_dir, "--max-new-tokens", "16"), capsys)
    assert "differs from upstream GPT-Neo's" in message and f"transformers {transformers.__version__}" in message
    assert not (tmp_path / "r.json").exists()
