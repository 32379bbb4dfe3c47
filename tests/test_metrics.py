"""Tests of spec_stream.metrics: SQL normalisation and validity, ROUGE-L, BLEU, repetition
and the per-task summary."""
from __future__ import annotations

import json

import pytest

from spec_stream.errors import UserError
from spec_stream.metrics import (bleu, is_valid_sql, normalize_sql, repeats_beyond_references, repetition_rate,
                                 rouge_l, spider_database, spider_exact_match, sql_validity, task_quality)


def test_normalize_sql():
    assert normalize_sql('SELECT  count( * )  FROM singer WHERE name = "Joe" ;') == (
        "select count ( * ) from singer where name = 'joe'"
    )
    assert normalize_sql("select count(*) from singer where name = 'Joe'") == normalize_sql(
        'SELECT count ( * ) FROM singer WHERE name = "Joe";'
    )
    assert normalize_sql("SELECT a,b FROM t") == normalize_sql("SELECT a , b FROM t") == "select a , b from t"


def test_spider_exact_match():
    predictions = [" SELECT count(*) FROM singer;", "SELECT name FROM singer", 'SELECT * FROM t WHERE x = "A"']
    references = [["SELECT count ( * ) FROM singer"], "SELECT age FROM singer", ["SELECT * FROM t WHERE x = 'a'"]]
    assert spider_exact_match(predictions, references) == pytest.approx(2 / 3)
    assert spider_exact_match([], []) == 0.0
    with pytest.raises(UserError, match="2 predictions but 1"):
        spider_exact_match(["a", "b"], ["a"])


def test_rouge_l_identical_disjoint_and_max_over_references():
    assert rouge_l(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    assert rouge_l(["the cat sat"], [["dogs bark loudly"]]) == 0.0
    two = rouge_l(["the cat sat on the mat"], [["dogs bark loudly", "the cat sat on the mat"]])
    assert two == pytest.approx(1.0)
    partial = rouge_l(["the cat sat on the mat"], [["the cat"]])
    assert 0.0 < partial < 1.0
    mean = rouge_l(["the cat sat on the mat", "x y z"], [["the cat sat on the mat"], ["a b c"]])
    assert mean == pytest.approx(0.5)
    assert rouge_l([], []) == 0.0


def test_bleu_identical_and_ragged_references():
    sentences = ["the quick brown fox jumps over the lazy dog", "a coffee shop in the city centre called blue spice"]
    assert bleu(sentences, [[s] for s in sentences]) == pytest.approx(100.0)
    ragged = [[sentences[0], "a fast brown fox leaps over a lazy dog", "the fox jumps"], [sentences[1]]]
    assert bleu(sentences, ragged) == pytest.approx(100.0)
    wrong = bleu(["completely unrelated words here today", "nothing matches at all"], ragged)
    assert 0.0 <= wrong < 5.0
    # the second reference only helps: a hypothesis matching it scores above one matching neither
    hypothesis = ["a fast brown fox leaps over a lazy dog"]
    assert bleu(hypothesis, [[sentences[0], hypothesis[0]]]) > bleu(hypothesis, [[sentences[0]]])
    # padding a short reference list must not add a zero-length reference (brevity penalty)
    short = ["the quick brown fox", sentences[1]]
    uneven = [[sentences[0]], [sentences[1], "blue spice is a coffee shop"]]
    repeated = [[sentences[0], sentences[0]], uneven[1]]
    assert bleu(short, uneven) == pytest.approx(bleu(short, repeated))
    assert 0.0 < bleu(short, uneven) < 100.0
    assert bleu([], []) == 0.0
    with pytest.raises(UserError, match="no reference"):
        bleu(["a"], [[]])


def test_task_quality_keys_and_errors():
    assert task_quality("spider", ["SELECT 1"], [["select 1;"]]) == {"exact_match": 1.0}
    assert set(task_quality("dialogsum", ["a b"], [["a b", "c"]])) == {"rougeL"}
    e2e = task_quality("e2e_nlg", ["the cat sat on the mat"], [["the cat sat on the mat"]])
    assert set(e2e) == {"bleu", "rougeL"} and e2e["bleu"] == pytest.approx(100.0)
    assert task_quality("e2e_nlg", [], []) == {}
    database = spider_database({"table_names_original": ["t"], "column_names_original": [[-1, "*"], [0, "a"]],
                                "column_types": ["text", "text"]})
    spider = task_quality("spider", ["SELECT a FROM t", "SELECT b FROM t"], ["select a from t", "x"], [database] * 2)
    assert spider == {"exact_match": 0.5, "valid_sql": 0.5}
    with pytest.raises(UserError, match="unknown task 'squad'.*spider"):
        task_quality("squad", ["a"], [["a"]])


@pytest.fixture(scope="module")
def spider_schemas(data_dir):
    return {entry["db_id"]: entry for entry in json.loads((data_dir / "spider" / "tables.json").read_text())}


def test_sql_validity_accepts_a_gold_query_and_rejects_broken_ones(spider_schemas):
    database = spider_database(spider_schemas["concert_singer"])
    gold = 'SELECT name , country , age FROM singer WHERE country = "France" ORDER BY age DESC'
    assert is_valid_sql(gold, database) and is_valid_sql(gold + " ;", database)
    for broken in ("SELECT nme FROM singer", "SELECT name FROM singers", "SELECT name FROM", "JOIN AS T2 ON T2.id",
                   "SELECT name FROM singer; SELECT 1", "", "   "):
        assert not is_valid_sql(broken, database), broken
    assert sql_validity([gold, "SELECT nme FROM singer"], [database, database]) == 0.5
    assert sql_validity([], []) == 0.0
    with pytest.raises(UserError, match="2 predictions but 1 databases"):
        sql_validity([gold, gold], [database])


def test_every_gold_query_of_spider_validation_is_valid(spider_schemas, data_dir):
    rows = [json.loads(line) for line in (data_dir / "spider" / "validation.jsonl").read_text().splitlines()]
    databases = {db_id: spider_database(schema) for db_id, schema in spider_schemas.items()}
    invalid = [row["query"] for row in rows if not is_valid_sql(row["query"], databases[row["db_id"]])]
    assert len(rows) == 1034 and invalid == []


def test_validity_check_changes_nothing(spider_schemas):
    database = spider_database(spider_schemas["concert_singer"])
    assert is_valid_sql("DROP TABLE singer", database)  # compiles: valid SQL, but EXPLAIN runs nothing
    assert is_valid_sql("SELECT count(*) FROM singer", database)
    assert database.execute("SELECT count(*) FROM singer").fetchone() == (0,)


def test_database_skips_sqlite_tables_and_repeated_columns():
    schema = {"table_names_original": ["sqlite_sequence", "Item"],
              "column_names_original": [[-1, "*"], [0, "name"], [0, "seq"], [1, "id"], [1, "ID"], [1, "label"]],
              "column_types": ["text", "text", "text", "number", "number", "text"]}
    database = spider_database(schema)
    assert is_valid_sql("SELECT id, label FROM item", database)
    assert [row[1] for row in database.execute("PRAGMA table_info(Item)")] == ["id", "label"]


def test_repetition_counts_only_repeats_the_references_lack():
    assert repeats_beyond_references("JOIN T2 ON T2.id = T2.id = T2.id", ["SELECT a FROM t"])
    assert not repeats_beyond_references("the cat sat on the mat", ["x"])
    # the reference repeats this 4-gram twice: twice is fine, three times is not
    twice = "a b c d and a b c d"
    assert not repeats_beyond_references(twice, [twice])
    assert repeats_beyond_references("a b c d a b c d a b c d", [twice])
    assert repeats_beyond_references("A B C D a b c d", ["z"])  # case-insensitive
    assert not repeats_beyond_references("a b c a b c", ["z"])  # a repeated 3-gram is no repeated 4-gram
    predictions = ["T1.id = T2.id = T1.id = T2.id", "fine text here", "the the the the the", "x"]
    assert repetition_rate(predictions, [["T1.id = T2.id"], ["y"], "the", ["x"]]) == 0.5
    assert repetition_rate([], []) == 0.0
