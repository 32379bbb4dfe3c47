"""The benchmark's tables: the default one fits a 120-column terminal, `--wide` shows every
column. Rendered from result rows shaped as the benchmark writes them, without running it."""
import io

import pytest
from rich.console import Console

import dataset_tps

ENGINES = {  # engine: (tokens/s, its min and max, speedup, tokens per call, the backend it names)
    "naive": (301.4, 297.2, 304.9, 1.0, 1.0, "eager, fp32"),
    "compiled": (452.0, 422.3, 464.8, 1.5, 1.0, "upstream eager, static cache, torch.compile inductor "
                 "(fullgraph, dynamic shapes); compiled in 8.9 s"),
    "spec_stream_int8": (609.3, 599.1, 612.7, 2.02, 2.31, "spec-stream sdpa, static cache, compiled steps, "
                         "tree (4,3,2) + lookup 4, int8 linear layers (per-token activations)"),
}
QUALITY = {"spider": {"exact_match": 0.0, "valid_sql": 0.02}, "dialogsum": {"rougeL": 0.2071},
           "e2e_nlg": {"bleu": 56.12, "rougeL": 0.6403}}


def result_row(dataset: str, engine: str, batch_size: int, sampled: bool) -> dict:
    rate, low, high, speedup, per_call, backend = ENGINES[engine]
    check = {"passed": False, "statistic": -3.52, "tokens_outside_support": 2} if sampled else None
    return {
        "dataset": dataset, "engine": engine, "batch_size": batch_size, "backend": backend,
        "tokens_per_second": rate, "tokens_per_second_spread": {"min": low, "max": high, "iqr": 3.25},
        "latency_seconds": 0.212, "predicted_ms_per_token": {"ms": 1.14, "bound": "memory"},
        "speedup_vs_naive": speedup, "tokens_per_call": per_call, "acceptance_rate": 0.643,
        "accepted_from_lookup": 1241, "accepted_from_streams": 312, "lookup_branch": 4,
        "identical_to_greedy": None if sampled else 0.86, "identical_to_naive": 0.86, "distribution_check": check,
        "bandwidth_share": 0.123, "quality": QUALITY[dataset], "repetition": 0.62, "peak_memory_mb": 1234.5,
        "truncated_prompts": 3 if dataset == "dialogsum" else 0,
    }


def rendered(argv: list[str], sampled: bool = False) -> list[str]:
    """The table of every dataset, engine and two batch sizes, rendered on a console far
    wider than a terminal (so nothing is folded to fit), as lines."""
    settings = dataset_tps.parse_settings(["--device", "cpu", "--batch-size", "1,16", *argv])
    rows = [result_row(d, e, b, sampled) for d in QUALITY for e in ENGINES for b in (1, 16)]
    skipped = [{"dataset": "spider", "engine": "prompt_lookup", "batch_size": 16,
                "reason": "upstream prompt lookup decodes one prompt at a time"}]
    output = io.StringIO()
    dataset_tps.print_table(rows, skipped, Console(file=output, width=400), settings)
    return output.getvalue().splitlines()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampling"])
def test_default_table_fits_a_terminal(sampled):
    lines = rendered(["--do-sample"] if sampled else [], sampled)
    assert max(map(len, lines)) <= dataset_tps.TERMINAL_WIDTH, "\n".join(lines)
    table = "\n".join(lines)
    for shown in ("spec_stream_int8", "609 (599-613)", "2.02x", "2.31", "bleu 56.1", "valid_sql 0.02", "--wide",
                  "dialogsum: 3 prompt(s) longer than the context"):  # cut prompts are counted under the table
        assert shown in table
    assert ("FAIL z=-3.52" in table) if sampled else ("86%" in table)


def test_wide_table_shows_every_column():
    table = "\n".join(rendered(["--wide"]))
    assert max(map(len, table.splitlines())) > dataset_tps.TERMINAL_WIDTH
    for column in dataset_tps.COLUMNS:
        assert column in table
    assert "609.3" in table and "599.1-612.7 (3.2)" in table and "int8 linear layers" in table


def test_spec_stream_is_set_beside_its_one_token_step():
    """Under each dataset's table: spec_stream over static from the same run, and the trees
    "auto" chose for its calls, so a tree that does not pay shows."""
    rows = [{"dataset": "dialogsum", "engine": "static", "batch_size": 1, "tokens_per_second": 400.0},
            {"dataset": "dialogsum", "engine": "spec_stream", "batch_size": 1, "tokens_per_second": 300.0,
             "trees_used": {"none": 30, "3,1": 120}},
            {"dataset": "e2e_nlg", "engine": "spec_stream", "batch_size": 1, "tokens_per_second": 500.0,
             "trees_used": {"2,2": 150}}]  # no static row: no line
    assert dataset_tps.tree_lines(rows) == [
        "dialogsum: spec_stream 0.75x static (its one-token step, this run); trees of its calls: 3,1 80%, none 20%"]


def test_spec_stream_brings_static():
    from torch import device

    assert dataset_tps.resolve_engines("spec_stream", None, device("cpu")) == ("naive", "static", "spec_stream")
    assert dataset_tps.resolve_engines("spec_stream,static", None, device("cpu")) == ("naive", "spec_stream", "static")
