"""Session fixtures: a briefly fine-tuned tiny model and the local dataset copies."""
import os

# OpenMP threads that spin while waiting make a shared machine crawl (one tiny training step:
# 4.5 s spinning, 0.06 s sleeping); set before torch starts its thread pool, inherited by
# the subprocesses the tests start.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite runs on one worker per core (pyproject: pytest-xdist's -n auto): one thread each,
# and the same in the subprocesses they start, so that a run and its resumed copy in a
# subprocess add floats in the same order.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
from pathlib import Path

import pytest

from spec_stream import defaults
from tests.helpers import tiny_model, train_phrase_model


@pytest.fixture(scope="session", autouse=True)
def eager_steps_in_engines():
    """The engines the tests build run their CPU steps eagerly: compiling a tree's step costs
    seconds to tens of seconds per tree and cache bucket, and the benchmark tests build many
    engines. tests/test_engines.py checks the compiled `spec_stream` itself (compile_step=True)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(defaults, "COMPILE_STEP_ON_CPU", False)
        yield


@pytest.fixture(scope="session")
def trained_model():
    """A tiny model fine-tuned with the Speculative Streaming loss until its first two streams are right on held-out phrase
    text at least 80% and 60% of the time (tests/helpers.py: `train_phrase_model`), so
    its streams are right often on its domain whatever the CPU's kernels and threads."""
    model = tiny_model(num_spec_streams=3, num_stream_layers=2, hidden_size=64, attn_implementation="sdpa")
    train_phrase_model(model)
    return model.eval()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """$SPEC_STREAM_DATA_DIR if set, else ``shared/datasets`` beside the checkout."""
    candidates = [os.environ.get("SPEC_STREAM_DATA_DIR"), Path(__file__).resolve().parents[1].parent / "shared" / "datasets"]
    for candidate in candidates:
        if candidate and Path(candidate, "e2e_nlg").is_dir():
            return Path(candidate)
    pytest.skip("local datasets not found: set SPEC_STREAM_DATA_DIR to a folder laid out like shared/datasets")


FINETUNE_EPOCHS = (5.0, 10.0)  # the fixture's runs, each from scratch, until one has learned
LEARNED_MARGIN = 0.03  # stream 1 and the main stream beat the unigram draft's accuracy by this


def learned(summary: dict) -> bool:
    floor = summary["unigram_accuracy"] + LEARNED_MARGIN
    return summary["stream_accuracy"][0] > floor and summary["main_accuracy"] > floor


@pytest.fixture(scope="session")
def finetuned_checkpoint(tmp_path_factory, data_dir):
    """One tiny model fine-tuned from scratch on 500 E2E-NLG rows, shared by every test that needs a trained checkpoint: ``(output folder, summary)``. It
    trains for 5 epochs, and again for 10 if its first stream has not learned by then (how
    far 5 epochs get depends on the CPU's kernels and threads: stream 1 beat the unigram draft
    by 0.039 on one setting); failing both, the session stops with the accuracies reached."""
    from spec_stream.finetune import finetune
    from spec_stream.training.config import FinetuneConfig

    reached = []
    for epochs in FINETUNE_EPOCHS:
        output = tmp_path_factory.mktemp("finetuned") / "e2e_nlg-tiny"
        summary = finetune(FinetuneConfig(
            dataset="e2e_nlg", output=str(output), data_dir=str(data_dir), from_scratch="tiny", max_train_samples=500,
            max_eval_samples=30, epochs=epochs, batch_size=8, max_length=128, lr=2e-3, seed=3,
        ))
        if learned(summary):
            return output, summary
        reached.append((epochs, summary["stream_accuracy"][0], summary["main_accuracy"], summary["unigram_accuracy"]))
    pytest.fail(f"the fine-tuned checkpoint did not learn (stream 1 and main accuracy above the unigram draft's "
                f"+ {LEARNED_MARGIN}); (epochs, stream 1, main, unigram) of each run: {reached}")


@pytest.fixture
def no_engine(monkeypatch):
    """Fails a test if any benchmark engine is built: checks must come before the first one."""
    import spec_stream.benchmark.task

    def refuse(*args, **kwargs):
        raise AssertionError("an engine was built before the bad input was refused")

    monkeypatch.setattr(spec_stream.benchmark.task, "build_engine", refuse)
