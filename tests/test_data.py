"""Tests of spec_stream.data: prompts on real rows, grouping, errors, hub fallback, tokenization."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import spec_stream.data as data_module
from spec_stream import hub
from spec_stream.data import (
    TASKS,
    Example,
    load_examples,
    resolve_tasks,
    task_names,
    tokenize_example,
)
from spec_stream.errors import UserError


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# ------------------------------------------------------------------------------ registry


def test_registry_and_resolve_tasks():
    assert task_names() == ["spider", "dialogsum", "e2e_nlg"]
    assert resolve_tasks("all") == task_names()
    assert resolve_tasks("e2e-nlg") == ["e2e_nlg"]
    assert {name: task.benchmark_split for name, task in TASKS.items()} == {
        "spider": "validation", "dialogsum": "test", "e2e_nlg": "test"
    }
    assert all(task.train_split == "train" for task in TASKS.values())
    assert TASKS["spider"].hub_id == "xlangai/spider" and TASKS["dialogsum"].hub_id == "knkarthick/dialogsum"
    with pytest.raises(UserError, match=r"unknown task 'squad'.*spider, dialogsum, e2e_nlg, or 'all'"):
        resolve_tasks("squad")


# ------------------------------------------------------------------------------- prompts


def test_e2e_prompt_and_grouping(data_dir):
    examples = load_examples("e2e_nlg", "test", data_dir)
    assert len(examples) == 630
    first = examples[0]
    assert first.prompt == (
        "Describe the restaurant: name[Blue Spice], eatType[coffee shop], area[city centre]\nDescription:"
    )
    assert first.target == " A coffee shop in the city centre area called Blue Spice."
    assert first.references[:2] == [
        "A coffee shop in the city centre area called Blue Spice.",
        "Blue Spice is a coffee shop in city centre.",
    ]
    assert sum(len(example.references) for example in examples) == 4693
    assert len({example.prompt for example in examples}) == 630
    assert len({example.id for example in examples}) == 630
    # limit counts grouped examples; the training split keeps one example per row
    assert [e.prompt for e in load_examples("e2e_nlg", "test", data_dir, limit=3)] == [e.prompt for e in examples[:3]]
    train = load_examples("e2e_nlg", "train", data_dir, limit=5)
    assert len(train) == 5 and all(len(example.references) == 1 for example in train)


def test_dialogsum_prompt_and_three_references(data_dir):
    test = load_examples("dialogsum", "test", data_dir)
    assert len(test) == 500
    assert all(len(example.references) == 3 for example in test)
    assert test[0].id == "test_0" and test[0].target == " " + test[0].references[0]
    validation = load_examples("dialogsum", "validation", data_dir, limit=1)[0]
    assert validation.prompt.startswith(
        "Summarize the dialogue.\n#Person1#: Hello, how are you doing today?\n#Person2#: I ' Ve been having"
    )
    assert validation.prompt.endswith("\nSummary:") and validation.prompt.count("\n#Person") > 3
    assert validation.target == (
        " #Person2# has trouble breathing. The doctor asks #Person2# about it and will send #Person2# to a "
        "pulmonary specialist."
    )
    assert validation.references == [validation.target[1:]]


def test_spider_prompt_has_schema_and_question(data_dir):
    first = load_examples("spider", "validation", data_dir, limit=1)[0]
    assert first.prompt.startswith("Schema:\nstadium(Stadium_ID, Location, Name, Capacity, Highest, Lowest, Average)\n")
    assert "\nsinger(Singer_ID, Name, Country, Song_Name, Song_release_year, Age, Is_male)\n" in first.prompt
    assert "\nsinger_in_concert(concert_ID, Singer_ID)\n" in first.prompt
    assert first.prompt.endswith("\nQuestion: How many singers do we have?\nSQL:")
    assert first.target == " SELECT count(*) FROM singer" and first.references == ["SELECT count(*) FROM singer"]
    train = load_examples("spider", "train", data_dir, limit=1)[0]
    assert train.target == " SELECT count(*) FROM head WHERE age > 56"  # whitespace collapsed
    assert train.prompt.startswith("Schema:\ndepartment(") and "\nhead(" in train.prompt


def test_every_prompt_ends_without_space_and_targets_start_with_one(data_dir):
    for task in task_names():
        for example in load_examples(task, TASKS[task].benchmark_split, data_dir, limit=50):
            assert not example.prompt[-1].isspace() and example.target.startswith(" ")
            assert not example.target.startswith("  ") and example.references


# -------------------------------------------------------------------------------- errors


def test_unknown_task_lists_valid_ones(data_dir):
    with pytest.raises(UserError, match="unknown task 'cnn'.*e2e_nlg"):
        load_examples("cnn", "test", data_dir)


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=rf"data directory {missing} does not exist.*--data-dir"):
        load_examples("e2e_nlg", "test", missing)


def test_missing_task_folder(tmp_path):
    with pytest.raises(UserError, match=rf"no folder {tmp_path / 'dialogsum'} for task dialogsum"):
        load_examples("dialogsum", "test", tmp_path)


def test_missing_split_names_available_ones(tmp_path):
    _write_jsonl(tmp_path / "e2e_nlg" / "train.jsonl", [{"meaning_representation": "name[A]", "human_reference": "A."}])
    with pytest.raises(UserError, match=r"no split 'dev'.*dev\.jsonl not found.*available splits.*: train"):
        load_examples("e2e_nlg", "dev", tmp_path)


def test_missing_column_names_file_line_and_column(tmp_path):
    path = tmp_path / "dialogsum" / "test.jsonl"
    _write_jsonl(path, [
        {"id": "a", "dialogue": "#Person1#: Hi.", "summary": "They greet."},
        {"id": "b", "dialogue": "#Person1#: Bye."},
    ])
    with pytest.raises(UserError) as error:
        load_examples("dialogsum", "test", tmp_path)
    assert f"{path} line 2" in str(error.value) and "'summary'" in str(error.value)


def test_bad_json_line(tmp_path):
    path = tmp_path / "e2e_nlg" / "test.jsonl"
    path.parent.mkdir()
    path.write_text('{"meaning_representation": "name[A]"\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path} line 1: not valid JSON"):
        load_examples("e2e_nlg", "test", tmp_path)


def test_unknown_spider_db_id(tmp_path):
    split_file = tmp_path / "spider" / "validation.jsonl"
    _write_jsonl(split_file, [{"db_id": "no_such_db", "query": "SELECT 1", "question": "?"}])
    tables = [{
        "db_id": "shop", "table_names_original": ["item"], "column_names_original": [[-1, "*"], [0, "id"], [0, "name"]],
        "column_types": ["text", "number", "text"], "primary_keys": [1], "foreign_keys": [],
    }]
    (tmp_path / "spider" / "tables.json").write_text(json.dumps(tables), encoding="utf-8")
    with pytest.raises(UserError, match=r"db_id 'no_such_db' is not in .*tables\.json"):
        load_examples("spider", "validation", tmp_path)
    _write_jsonl(split_file, [{"db_id": "shop", "query": "SELECT  1 ;", "question": "Q ?"}])
    assert load_examples("spider", "validation", tmp_path)[0].prompt == "Schema:\nitem(id, name)\nQuestion: Q ?\nSQL:"


def test_negative_limit(data_dir):
    with pytest.raises(UserError, match=r"limit must be a number of examples >= 0 \(or None for all\), got -1$"):
        load_examples("e2e_nlg", "test", data_dir, limit=-1)


def test_non_utf8_byte_names_file_line_and_byte(tmp_path):
    path = tmp_path / "e2e_nlg" / "test.jsonl"
    _write_jsonl(path, [{"meaning_representation": "name[A]", "human_reference": "A."}] * 3)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + lines[1].replace(b"A.", b"Caf\xe9.") + lines[2])
    with pytest.raises(UserError) as error:
        load_examples("e2e_nlg", "test", tmp_path)
    column = lines[1].index(b"A.") + 4
    assert str(error.value) == (f"{path} line 2: byte 0xe9 at column {column} is not UTF-8; "
                                "save the file as UTF-8 or fix that line")
    path.write_bytes(lines[0] + lines[1].replace(b"A.", "Café.".encode()) + lines[2])  # real UTF-8 reads fine
    assert load_examples("e2e_nlg", "test", tmp_path)[0].references == ["A.", "Café.", "A."]


def test_each_prompt_text_is_written_once():
    """The prompt wording of each task lives in one place in the package: its builder."""
    package = Path(data_module.__file__).parent
    source = "".join(path.read_text(encoding="utf-8") for path in sorted(package.glob("*.py")))
    for cue in ("Describe the restaurant:", "\\nDescription:", "Summarize the dialogue.", "\\nSummary:",
                "Schema:\\n", "Question: {_clean(row", "\\nSQL:"):
        assert source.count(cue) == 1, cue


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("SPEC_STREAM_DATA_DIR", str(data_dir))
    assert len(load_examples("e2e_nlg", "validation", limit=2)) == 2


def test_hub_without_network_fails_fast(monkeypatch):
    monkeypatch.delenv("SPEC_STREAM_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub libraries read HF_HUB_OFFLINE when first imported; patch their copies too.
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"knkarthick/dialogsum.*--data-dir DIR.*SPEC_STREAM_DATA_DIR"):
        load_examples("dialogsum", "test")
    assert time.monotonic() - start < 15


def test_unreachable_hub_is_refused_at_once_without_retries(monkeypatch):
    """No offline flag, no network: one probe says so, and the hub client never starts (its
    retries took 29 s before its own error)."""
    datasets = pytest.importorskip("datasets")
    for flag in hub.OFFLINE_FLAGS + ("SPEC_STREAM_DATA_DIR",):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(data_module, "hub_reachable", lambda: False)

    def retrying(*args, **kwargs):
        raise AssertionError("the hub client ran although the hub was known to be unreachable")

    monkeypatch.setattr(datasets, "load_dataset", retrying)
    with pytest.raises(UserError, match=r"knkarthick/dialogsum.*not reachable.*--data-dir DIR.*HF_HUB_OFFLINE=1"):
        load_examples("dialogsum", "test")


def test_the_hub_probe_is_one_short_connection(monkeypatch):
    attempts = []

    def refuse(address, timeout):
        attempts.append((address, timeout))
        raise ConnectionRefusedError(address)

    monkeypatch.setattr(hub.socket, "create_connection", refuse)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    hub.hub_reachable.cache_clear()
    try:
        assert not hub.hub_reachable() and not hub.hub_reachable()  # asked once per process
    finally:
        hub.hub_reachable.cache_clear()
    assert attempts == [(("hub.example", 8443), hub.PROBE_SECONDS)] and hub.PROBE_SECONDS <= 3


def test_spider_from_the_hub_without_tables_json_falls_back_to_schema_free_prompts(monkeypatch, data_dir):
    """The hub's Spider rows come without schemas: prompts hold the question alone, one
    warning says how to get schema prompts, and the benchmark scores no SQL validity."""
    import spec_stream.data as data_module
    from spec_stream.benchmark.inputs import spider_databases

    monkeypatch.delenv("SPEC_STREAM_DATA_DIR", raising=False)
    monkeypatch.delenv("SPEC_STREAM_SPIDER_TABLES", raising=False)
    local = list(data_module._read_jsonl(data_dir / "spider" / "validation.jsonl"))[:5]
    monkeypatch.setattr(data_module, "_hub_rows", lambda task, split: iter(local))
    data_module._warn_schema_free.cache_clear()
    with pytest.warns(UserWarning, match=r"SPEC_STREAM_SPIDER_TABLES.*tables\.json.*--data-dir"):
        examples = load_examples("spider", "validation")
    assert [e.prompt for e in examples] == [f"Question: {' '.join(row['question'].split())}\nSQL:" for _, row in local]
    assert examples[0].references == [" ".join(local[0][1]["query"].split())]
    assert spider_databases([e.prompt for e in examples], None) == [None] * 5


# -------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE wrapped as a transformers fast tokenizer with GPT-Neo's eos."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    texts = ["Describe the restaurant: name[Blue Spice]\nDescription: A coffee shop called Blue Spice."] * 5
    bpe.train_from_iterator(
        texts, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


def _example() -> Example:
    prompt = "Describe the restaurant: name[Blue Spice]\nDescription:"
    return Example(prompt, " A coffee shop called Blue Spice.", ["A coffee shop called Blue Spice."], "x")


def test_tokenize_example_labels_prompt_and_eos(tokenizer):
    example = _example()
    prompt_ids = tokenizer.encode(example.prompt, add_special_tokens=False)
    target_ids = tokenizer.encode(example.target, add_special_tokens=False)
    features = tokenize_example(tokenizer, example, max_length=512)
    assert features["input_ids"] == prompt_ids + target_ids + [tokenizer.eos_token_id]
    assert features["labels"] == [-100] * len(prompt_ids) + target_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(features["input_ids"][len(prompt_ids):-1]) == example.target


def test_tokenize_example_truncates_prompt_from_the_left(tokenizer):
    example = _example()
    prompt_ids = tokenizer.encode(example.prompt, add_special_tokens=False)
    target_ids = tokenizer.encode(example.target, add_special_tokens=False) + [tokenizer.eos_token_id]
    max_length = len(target_ids) + 3
    assert len(prompt_ids) > 3
    features = tokenize_example(tokenizer, example, max_length=max_length)
    assert len(features["input_ids"]) == max_length
    assert features["input_ids"] == prompt_ids[-3:] + target_ids
    assert features["labels"] == [-100] * 3 + target_ids


def test_tokenize_example_cuts_target_end_when_it_alone_does_not_fit(tokenizer):
    example = _example()
    prompt_ids = tokenizer.encode(example.prompt, add_special_tokens=False)
    target_ids = tokenizer.encode(example.target, add_special_tokens=False)
    assert len(target_ids) > 3
    features = tokenize_example(tokenizer, example, max_length=4)
    assert features["input_ids"] == prompt_ids[-1:] + target_ids[:3]
    assert features["labels"] == [-100] + target_ids[:3]
    with pytest.raises(UserError, match="max_length"):
        tokenize_example(tokenizer, example, max_length=0)


def test_hub_rows_are_used_and_dialogsum_test_rows_merged(monkeypatch):
    """The hub path with `datasets.load_dataset` replaced: its test_N_k rows become one example."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.delenv("SPEC_STREAM_DATA_DIR", raising=False)
    rows = [
        {"id": f"test_{n}_{k}", "dialogue": f"#Person1#: Hi {n}.", "summary": f"Summary {n}.{k}", "topic": "t"}
        for n in range(2) for k in (1, 2, 3)
    ]
    calls = []
    monkeypatch.setattr(data_module, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda hub_id, split: calls.append((hub_id, split)) or rows)
    examples = load_examples("dialogsum", "test", limit=1)
    assert calls == [("knkarthick/dialogsum", "test")]
    assert [(e.id, e.references) for e in examples] == [("test_0", ["Summary 0.1", "Summary 0.2", "Summary 0.3"])]
    assert examples[0].prompt == "Summarize the dialogue.\n#Person1#: Hi 0.\nSummary:"
    rows.append({"id": "test_9_1", "dialogue": "x"})
    with pytest.raises(UserError, match=r"hub knkarthick/dialogsum split test row 6: row lacks column 'summary'"):
        load_examples("dialogsum", "test")
