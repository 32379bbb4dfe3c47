"""Tests of spec_stream.metrics: SQL normalisation, ROUGE-L, BLEU and the per-task summary."""
from __future__ import annotations

import pytest

from spec_stream.errors import UserError
from spec_stream.metrics import bleu, normalize_sql, rouge_l, spider_exact_match, task_quality


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
    with pytest.raises(UserError, match="unknown task 'squad'.*spider"):
        task_quality("squad", ["a"], [["a"]])
