"""Quality metrics of the three tasks, computed with `rouge_score` and `sacrebleu` directly.

- ``spider``: :func:`spider_exact_match`, the share of predictions whose SQL equals the
  reference *as a string* after :func:`normalize_sql`. This is stricter and simpler than
  Spider's official component matching (no parsing, no value or alias handling); use it
  to compare decoders on the same model, not to report Spider scores. Beside it,
  :func:`sql_validity`: the share of predictions that SQLite accepts for their database's
  schema (:func:`spider_database` builds an empty in-memory database from the official
  ``tables.json``; :func:`is_valid_sql` compiles the query with ``EXPLAIN`` without running
  it). Every gold query of Spider's validation split passes.
- ``dialogsum``: :func:`rouge_l`, ROUGE-L F1 (Porter stemmer), the best over each
  example's references, averaged over examples, in [0, 1].
- ``e2e_nlg``: :func:`bleu`, sacrebleu corpus BLEU (13a tokenizer) against all references
  of each meaning representation, in [0, 100], and :func:`rouge_l`.

For every task, :func:`repetition_rate`: the share of predictions that repeat a 4-gram
more often than any of their references does, so degenerate output (``T2.id = T2.id =
T2.id``) shows even where a quality metric barely moves.

Predictions and references are stripped of surrounding whitespace (targets start with a
space, see :mod:`spec_stream.data`). Each entry of ``references_list`` is a list of
reference strings (a lone string is taken as a one-item list). Empty inputs score 0.0 in
the single metrics and give ``{}`` from :func:`task_quality` (nothing was measured).
"""
from __future__ import annotations

import re
import sqlite3
from collections import Counter
from typing import Any, Mapping, Sequence

from spec_stream.errors import UserError

References = Sequence[str] | str

TASK_METRICS = {"spider": ("exact_match",), "dialogsum": ("rougeL",), "e2e_nlg": ("bleu", "rougeL")}


def _reference_lists(predictions: Sequence[str], references_list: Sequence[References]) -> list[list[str]]:
    """Stripped reference lists, one per prediction; UserError on a length mismatch or no reference."""
    if len(predictions) != len(references_list):
        raise UserError(
            f"{len(predictions)} predictions but {len(references_list)} reference entries; "
            "pass one entry per prediction"
        )
    lists = []
    for index, references in enumerate(references_list):
        items = [references] if isinstance(references, str) else list(references)
        if not items:
            raise UserError(f"example {index} has no reference text; give every example at least one reference")
        lists.append([str(reference).strip() for reference in items])
    return lists


def normalize_sql(sql: str) -> str:
    """Canonical text of a SQL query for string comparison.

    Lowercase; double quotes become single quotes; one space on each side of ``(``, ``)``
    and ``,``; whitespace runs collapsed to one space; trailing ``;`` removed. Note that
    string literals are lowercased too, so ``'Paris'`` equals ``'paris'``.
    """
    text = sql.strip().lower().replace('"', "'")
    text = re.sub(r"\s*([(),])\s*", r" \1 ", text)
    text = " ".join(text.split())
    return text.rstrip("; ").strip()


def spider_exact_match(predictions: Sequence[str], references: Sequence[References]) -> float:
    """Share in [0, 1] of predictions equal to one of their references after :func:`normalize_sql`."""
    reference_lists = _reference_lists(predictions, references)
    if not predictions:
        return 0.0
    hits = sum(
        normalize_sql(prediction) in {normalize_sql(reference) for reference in refs}
        for prediction, refs in zip(predictions, reference_lists)
    )
    return hits / len(predictions)


def rouge_l(predictions: Sequence[str], references_list: Sequence[References]) -> float:
    """Mean over examples of the best ROUGE-L F1 (``rougeL``, stemmed) over the references, in [0, 1]."""
    reference_lists = _reference_lists(predictions, references_list)
    if not predictions:
        return 0.0
    from rouge_score import rouge_scorer  # noqa: PLC0415  (loads nltk's stemmer: only when needed)

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = 0.0
    for prediction, refs in zip(predictions, reference_lists):
        total += max(scorer.score(reference, prediction.strip())["rougeL"].fmeasure for reference in refs)
    return total / len(predictions)


def bleu(predictions: Sequence[str], references_list: Sequence[References]) -> float:
    """sacrebleu corpus BLEU in [0, 100] with every reference of each example.

    sacrebleu takes reference *streams* of equal length (stream ``k`` holds the ``k``-th
    reference of every example); examples with fewer references are padded with ``None``,
    which sacrebleu documents as "no reference here" (an empty string would count as a
    zero-length reference and change the brevity penalty).
    """
    reference_lists = _reference_lists(predictions, references_list)
    if not predictions:
        return 0.0
    import sacrebleu  # noqa: PLC0415

    width = max(len(refs) for refs in reference_lists)
    streams = [[refs[k] if k < len(refs) else None for refs in reference_lists] for k in range(width)]
    hypotheses = [prediction.strip() for prediction in predictions]
    return float(sacrebleu.corpus_bleu(hypotheses, streams).score)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def spider_database(schema: Mapping[str, Any]) -> sqlite3.Connection:
    """An empty in-memory SQLite database with the tables and columns of one entry of
    Spider's ``tables.json`` (``table_names_original``, ``column_names_original``,
    ``column_types``), read-only once built.

    Keys are left out: they never decide whether a query compiles. Tables named
    ``sqlite_*`` (``sqlite_sequence`` in a few schemas) are SQLite's own and are skipped, as
    are repeated column names within a table (SQLite compares names case-insensitively).
    """
    database = sqlite3.connect(":memory:")
    columns: list[dict[str, str]] = [{} for _ in schema["table_names_original"]]
    for (table, column), kind in zip(schema["column_names_original"], schema["column_types"]):
        if table >= 0:
            columns[table].setdefault(column.lower(), f"{_quote(column)} {kind}")
    for table, definitions in zip(schema["table_names_original"], columns):
        if not table.lower().startswith("sqlite_"):
            database.execute(f"CREATE TABLE {_quote(table)} ({', '.join(definitions.values())})")
    database.execute("PRAGMA query_only = ON")
    return database


def is_valid_sql(query: str, database: sqlite3.Connection) -> bool:
    """Whether SQLite compiles ``query`` (one statement) against ``database``'s schema:
    ``EXPLAIN`` prepares it and lists its bytecode, so nothing is executed or changed."""
    if not query.strip():
        return False
    try:
        database.execute(f"EXPLAIN {query}").fetchall()
    except (sqlite3.Error, sqlite3.Warning):  # syntax, unknown table/column, several statements
        return False
    return True


def sql_validity(predictions: Sequence[str], databases: Sequence[sqlite3.Connection]) -> float:
    """Share in [0, 1] of predictions that :func:`is_valid_sql` accepts for their database
    (``databases[i]`` belongs to ``predictions[i]``); 0.0 for no predictions."""
    if len(predictions) != len(databases):
        raise UserError(f"{len(predictions)} predictions but {len(databases)} databases; pass one per prediction")
    if not predictions:
        return 0.0
    return sum(is_valid_sql(p, db) for p, db in zip(predictions, databases)) / len(predictions)


def _ngram_counts(text: str, n: int) -> Counter:
    tokens = re.findall(r"\w+|[^\w\s]", text.lower())  # words and single punctuation marks
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def repeats_beyond_references(prediction: str, references: Sequence[str], n: int = 4) -> bool:
    """Whether ``prediction`` holds an ``n``-gram at least twice and more often than every
    reference does (case-insensitive; words and punctuation marks are the tokens)."""
    reference_counts = [_ngram_counts(reference, n) for reference in references]
    return any(count >= 2 and all(count > counts[gram] for counts in reference_counts)
               for gram, count in _ngram_counts(prediction, n).items())


def repetition_rate(predictions: Sequence[str], references_list: Sequence[References], n: int = 4) -> float:
    """Share in [0, 1] of predictions that :func:`repeats_beyond_references`; 0.0 for none."""
    reference_lists = _reference_lists(predictions, references_list)
    if not predictions:
        return 0.0
    flagged = sum(repeats_beyond_references(p, refs, n) for p, refs in zip(predictions, reference_lists))
    return flagged / len(predictions)


def task_quality(task: str, predictions: Sequence[str], references_list: Sequence[References],
                 databases: Sequence[sqlite3.Connection] | None = None) -> dict[str, float]:
    """The metrics of ``task``: spider ``exact_match`` (plus ``valid_sql`` when ``databases``,
    one per prediction, are given); dialogsum ``rougeL``; e2e_nlg ``bleu``, ``rougeL``.

    Returns ``{}`` for no predictions (nothing measured, rather than a misleading 0).
    """
    key = str(task).strip().lower().replace("-", "_")
    if key not in TASK_METRICS:
        raise UserError(f"unknown task {task!r} for metrics; use one of: {', '.join(TASK_METRICS)}")
    _reference_lists(predictions, references_list)
    if not predictions:
        return {}
    functions = {"exact_match": spider_exact_match, "rougeL": rouge_l, "bleu": bleu}
    scores = {name: functions[name](predictions, references_list) for name in TASK_METRICS[key]}
    if key == "spider" and databases is not None:
        scores["valid_sql"] = sql_validity(predictions, databases)
    return scores
