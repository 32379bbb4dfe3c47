"""Your own data: a dataset made up here (not one of the presets), as JSON lines, CSV, a
folder of split files and a (stubbed) hub dataset, through `spec_stream.data`, the
fine-tuning CLI and the benchmark CLI."""
import csv
import json
import time
from pathlib import Path

import pytest

import dataset_tps
from spec_stream import defaults
from spec_stream.data import CustomDataset, load_examples, resolve_dataset
from spec_stream.errors import UserError
from spec_stream.finetune import main as finetune_main

ITEMS = ["apples", "pears", "plums", "figs", "limes", "dates"]
PROMPT = "Pack {count} boxes of {item}, {size} per box.\\nHow many {item}?"  # as a shell passes it
PROMPT_TEXT = "Pack {count} boxes of {item}, {size} per box.\nHow many {item}?"


def made_up_rows(count: int = 60) -> list[dict]:
    """Rows of a tiny arithmetic task: the answer is count * size items."""
    return [{"item": ITEMS[i % len(ITEMS)], "count": str(2 + i % 7), "size": str(3 + i % 5),
             "answer": f"{(2 + i % 7) * (3 + i % 5)} {ITEMS[i % len(ITEMS)]}"} for i in range(count)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def prompt_of(row: dict) -> str:
    return PROMPT_TEXT.format(**row)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The same 60 rows as ``units.jsonl`` and ``units.csv``."""
    folder = tmp_path_factory.mktemp("own-data")
    rows = made_up_rows()
    return {"jsonl": write_jsonl(folder / "units.jsonl", rows), "csv": write_csv(folder / "units.csv", rows)}


def spec(path: Path, **templates) -> CustomDataset:
    return resolve_dataset(str(path), **({"prompt_template": PROMPT, "response_field": "answer"} | templates))


def refused(main, argv, capsys) -> str:
    """The one-line error of a CLI that must exit 2 (after progress bars of checks, if any)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        main([str(a) for a in argv])
    last = capsys.readouterr().err.splitlines()[-1]
    assert exit.value.code == 2 and last.startswith("error: ") and "Traceback" not in last, last
    return last


# ------------------------------------------------------------------------------ splits


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_single_file_is_held_out_80_10_10_in_file_order(files, kind):
    rows = made_up_rows()
    splits = {split: load_examples(spec(files[kind]), split) for split in ("train", "validation", "test")}
    assert {split: len(examples) for split, examples in splits.items()} == {"train": 48, "validation": 6, "test": 6}
    position = {prompt_of(row): index for index, row in enumerate(rows)}
    assert len(position) == len(rows)  # every prompt names its row
    chosen = {split: [position[e.prompt] for e in examples] for split, examples in splits.items()}
    assert sorted(sum(chosen.values(), [])) == list(range(len(rows)))  # disjoint, and every row used
    assert all(numbers == sorted(numbers) for numbers in chosen.values())  # the file's order kept
    assert chosen["test"] != list(range(6))  # a random hold-out, not the file's head
    again = [position[e.prompt] for e in load_examples(spec(files[kind]), "test")]
    assert again == chosen["test"]  # fixed seed: the same test rows every time


def test_jsonl_and_csv_of_the_same_rows_give_the_same_examples(files):
    for split in ("train", "validation", "test"):
        from_jsonl, from_csv = (load_examples(spec(files[kind]), split) for kind in ("jsonl", "csv"))
        assert [(e.prompt, e.target, e.references) for e in from_jsonl] == \
               [(e.prompt, e.target, e.references) for e in from_csv]


def test_the_hold_out_does_not_depend_on_the_training_seed():
    assert defaults.HOLDOUT_SEED == 0 and defaults.HOLDOUT_SHARE == 0.1


def test_examples_follow_the_templates(files):
    rows = made_up_rows()
    first = load_examples(spec(files["jsonl"]), "train")[0]
    row = next(r for r in rows if prompt_of(r) == first.prompt)
    item = row["item"]
    assert first.prompt == f"Pack {row['count']} boxes of {item}, {row['size']} per box.\nHow many {item}?"
    assert first.target == " " + row["answer"] and first.references == [row["answer"]]
    assert first.id == "units/train/0"
    in_all = spec(files["jsonl"], response_field=None, response_template="{answer} in all")
    templated = load_examples(in_all, "train")[0]
    assert templated.target == f" {row['answer']} in all" and templated.prompt == first.prompt


def test_csv_cells_stay_the_text_they_are(tmp_path):
    path = write_csv(tmp_path / "codes.csv", [{"code": "007", "name": "NA"}, {"code": "010", "name": "null"},
                                              {"code": "3", "name": "x"}])
    codes = resolve_dataset(str(path), "Code {code}:", "name")
    examples = {split: load_examples(codes, split) for split in ("train", "validation", "test")}
    assert [len(e) for e in examples.values()] == [1, 1, 1]  # 3 rows: one per split
    pairs = {e.prompt: e.target for split in examples.values() for e in split}
    assert pairs == {"Code 007:": " NA", "Code 010:": " null", "Code 3:": " x"}


def test_a_folder_keeps_its_own_splits(tmp_path):
    rows = made_up_rows(9)
    for index, split in enumerate(("train", "validation", "test")):
        write_jsonl(tmp_path / "data" / f"{split}.jsonl", rows[3 * index:3 * index + 3])
    test = load_examples(spec(tmp_path / "data"), "test")
    assert [e.prompt for e in test] == [prompt_of(row) for row in rows[6:]]
    with pytest.raises(UserError) as error:
        load_examples(spec(tmp_path / "data"), "dev")
    message = str(error.value)
    assert "has no split 'dev'" in message and all(s in message for s in ("train", "validation", "test"))


def test_a_hub_dataset_is_loaded_with_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = made_up_rows(8)
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:5]),
                                    test=datasets.Dataset.from_list(rows[5:]))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    examples = load_examples(spec("someone/units"), "test")
    assert calls == [("someone/units", {})]
    assert [e.prompt for e in examples] == [prompt_of(row) for row in rows[5:]]
    assert examples[0].id == "units/test/0"


def test_the_hub_unreachable_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"could not load 'someone/no-such-units' from the Hugging Face hub .*"
                                        r"--dataset FILE\.jsonl"):
        load_examples(spec("someone/no-such-units"), "train")
    assert time.monotonic() - start < 15


# ---------------------------------------------------------------------------- errors


def test_a_missing_column_names_the_columns_there(files):
    with pytest.raises(UserError) as error:
        load_examples(spec(files["csv"], prompt_template="{itme} x {count}"), "train")
    assert str(error.value) == (f"--prompt-template names column 'itme', which {files['csv']} lacks; "
                                "its columns are: item, count, size, answer")
    with pytest.raises(UserError, match=r"--response-field names column 'reply'.*its columns are: item, count"):
        load_examples(spec(files["jsonl"], response_field="reply"), "train")


def test_a_row_without_a_value_names_its_row(tmp_path):
    rows = made_up_rows(30)
    del rows[4]["answer"]
    path = write_jsonl(tmp_path / "gap.jsonl", rows)
    with pytest.raises(UserError, match=rf"{path} row 5 has no value in column 'answer'; fill it in or remove"):
        for split in ("train", "validation", "test"):
            load_examples(spec(path), split)


BAD_FLAGS = [
    ("{jsonl}", [], "is your own data: say how a row becomes a prompt with --prompt-template"),
    ("{jsonl}", ["--prompt-template", "{item}"], "exactly one of --response-field COLUMN or --response-template"),
    ("{jsonl}", ["--prompt-template", "{item", "--response-field", "answer"], "write a column as {{column}}"),
    ("{jsonl}", ["--prompt-template", "{} {}", "--response-field", "answer"], "must name the columns it uses"),
    ("{missing}", ["--prompt-template", "{item}", "--response-field", "answer"], "no such file"),
    ("{text}", ["--prompt-template", "{item}", "--response-field", "answer"], "unknown file type '.txt'"),
    ("e2e_nlg", ["--prompt-template", "{item}", "--response-field", "answer"], "is a preset with its own prompt"),
    ("{jsonl}", ["--prompt-template", "{itme}", "--response-field", "answer"],
     "names column 'itme', which {jsonl} lacks; its columns are: item, count, size, answer"),
    ("{jsonl}", ["--prompt-template", PROMPT, "--response-field", "answer", "--eval-split", "dev"],
     "has no split 'dev'; its splits are: train, validation, test"),
]


@pytest.mark.parametrize("dataset, flags, words", BAD_FLAGS, ids=[w[:40] for _, _, w in BAD_FLAGS])
def test_bad_flags_are_refused_by_both_clis_before_any_work(files, units_checkpoint, tmp_path, capsys, dataset,
                                                            flags, words):
    names = {"jsonl": files["jsonl"], "missing": tmp_path / "none.jsonl", "text": tmp_path / "units.txt"}
    (tmp_path / "units.txt").write_text("item\n")
    dataset, words = dataset.format(**names), words.format(**names)
    output = tmp_path / "out"
    err = refused(finetune_main, ["--dataset", dataset, "--output", output, *flags], capsys)
    assert words in err and not output.exists()
    benchmark_flags = [f.replace("--eval-split", "--test-split") for f in flags]
    err = refused(dataset_tps.main, ["--dataset", dataset, "--model", units_checkpoint, "--output",
                                     tmp_path / "r.json", *benchmark_flags], capsys)
    assert words in err and not (tmp_path / "r.json").exists()


def test_templates_with_all_presets_are_refused(capsys, tmp_path):
    err = refused(dataset_tps.main, ["--dataset", "all", "--prompt-template", "{a}", "--output", tmp_path / "r.json"],
                  capsys)
    assert "--dataset FILE_OR_HUB_ID instead of all" in err


# ----------------------------------------------------------- fine-tune, then benchmark


def benchmark_argv(dataset: Path, output: Path, *extra) -> list[str]:
    return ["--dataset", str(dataset), "--prompt-template", PROMPT, "--response-field", "answer",
            "--model_type", "spec_stream", "--num-samples", "3", "--max-new-tokens", "8", "--repeats", "1",
            "--device", "cpu", "--output", str(output), *extra]


def check_report(report: dict, dataset: Path) -> None:
    rows = {row["engine"]: row for row in report["results"]}
    assert set(rows) == {"naive", "static", "spec_stream"}  # spec_stream brings its one-token step
    for row in rows.values():
        assert row["dataset"] == str(dataset) and row["split"] == "test" and row["samples"] == 3
        assert set(row["quality"]) == {"rougeL", "bleu"} and all(0 <= v <= 100 for v in row["quality"].values())
    assert rows["spec_stream"]["identical_to_greedy"] == 1.0
    assert report["settings"]["datasets"] == [{"source": str(dataset), "prompt_template": PROMPT_TEXT,
                                               "response_field": "answer", "response_template": None}]


@pytest.fixture(scope="module")
def units_checkpoint(files, tmp_path_factory) -> Path:
    """A tiny model fine-tuned from scratch on units.jsonl through the command line."""
    checkpoint = tmp_path_factory.mktemp("units") / "units-model"
    assert finetune_main(["--dataset", str(files["jsonl"]), "--prompt-template", PROMPT, "--response-field", "answer",
                          "--output", str(checkpoint), "--epochs", "2", "--batch-size", "8", "--max-length", "64"]) == 0
    return checkpoint


def test_finetune_on_jsonl_then_benchmark_on_csv(files, units_checkpoint, tmp_path):
    checkpoint = units_checkpoint
    saved = json.loads((checkpoint / "training_args.json").read_text())
    assert saved["summary"]["train_split"] == "units/train" and saved["summary"]["eval_split"] == "units/validation"
    assert saved["summary"]["steps"] == 12 and saved["summary"]["final_loss"] < saved["summary"]["first_loss"]
    assert saved["args"]["prompt_template"] == PROMPT and saved["args"]["response_field"] == "answer"
    report_path = tmp_path / "report.json"
    assert dataset_tps.main(benchmark_argv(files["csv"], report_path, "--model", str(checkpoint))) == 0
    check_report(json.loads(report_path.read_text()), files["csv"])


def test_the_benchmark_prepares_a_checkpoint_for_your_data(files, tmp_path):
    report_path = tmp_path / "report.json"
    argv = benchmark_argv(files["jsonl"], report_path, "--checkpoint-dir", str(tmp_path / "checkpoints"))
    assert dataset_tps.main(argv) == 0
    check_report(json.loads(report_path.read_text()), files["jsonl"])
    base, prepared = sorted((tmp_path / "checkpoints").iterdir())  # stage 1 and stage 2 (`default_checkpoint`)
    size = defaults.DEFAULT_RECIPES["cpu"]["size"]
    assert base.name.startswith("units-") and base.name.endswith(f"-{size}-base")
    assert prepared.name == base.name.replace("-base", "-streams")
    saved = json.loads((prepared / "training_args.json").read_text())
    assert saved["args"]["dataset"] == str(files["jsonl"]) and saved["args"]["prompt_template"] == PROMPT_TEXT
