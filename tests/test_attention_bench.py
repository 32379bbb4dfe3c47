"""scripts/attention_bench.py: a tiny sweep writes its JSON and plots; memory is measured
(and matches its formula); a sweep stops cleanly where memory would run out; bad input is
refused."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "attention_bench.py"
PLOTS = ("memory_vs_batch.png", "time_vs_batch.png", "time_vs_tokens.png")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("attention_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_sweep_writes_json_and_plots(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--output", str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "attention_bench.json").read_text())
    runs = [m for m, status in report["methods"].items() if status == "runs"]
    assert {"eager", "sdpa"} <= set(runs)
    assert report["settings"]["batch_sizes"] == [2, 4, 8] and report["memory_measure"]
    for sweep, points in (("batch_sweep", [(b, 64) for b in (2, 4, 8)]), ("token_sweep", [(4, 32), (4, 64)])):
        rows = report[sweep]
        assert [(r["method"], r["batch"], r["tokens"]) for r in rows] == [(m, b, t) for m in runs for b, t in points]
        for row in rows:
            assert row["status"] == "ok" and row["repeats"] == 3 and len(row["seconds"]) == 3
            assert 0 < row["min_seconds"] <= row["median_seconds"] <= row["max_seconds"]
            assert row["predicted_bytes"] > 0 and isinstance(row["peak_bytes"], int)
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["plots"] == list(PLOTS)


def test_memory_is_measured_and_a_sweep_stops_before_it_runs_out(bench, tmp_path, monkeypatch, capsys):
    # 512 tokens: 2 MiB of scores and probabilities per row, far above the few hundred KiB
    # by which a process's peak RSS wanders from run to run (page faults, allocator arenas)
    itemsize, tokens, embedding = 4, 512, 64
    eager_at_8 = bench.input_bytes(8, tokens, embedding, itemsize) + bench.predicted_bytes(
        "eager", 8, tokens, embedding, itemsize)
    monkeypatch.setattr(bench, "available_memory", lambda device: int(0.9 * eager_at_8 / 0.7))
    argv = ["--tokens", str(tokens), "--embedding", str(embedding), "--batch-sizes", "1,2,4,8",
            "--sweep-tokens", str(tokens), "--sweep-batch", "1", "--methods", "eager,sdpa", "--repeats", "3",
            "--output", str(tmp_path)]
    assert bench.main(argv) == 0
    rows = json.loads((tmp_path / "attention_bench.json").read_text())["batch_sweep"]
    eager = [r for r in rows if r["method"] == "eager"]
    assert [r["status"] for r in eager[:3]] == ["ok"] * 3 and len(eager) == 4
    assert eager[3]["batch"] == 8 and "out of memory" in eager[3]["status"] and "stops here" in eager[3]["status"]
    assert [r["status"] for r in rows if r["method"] == "sdpa"] == ["ok"] * 4  # its kernel needs far less
    for row in eager[1:3]:  # 4-8 MiB of scores and probabilities: the measure must see them
        assert abs(row["peak_bytes"] - row["predicted_bytes"]) < 0.25 * row["predicted_bytes"] + 2**18
    assert "batch    8" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--methods", "eager,fast"], "unknown --methods fast"),
    (["--repeats", "2"], "--repeats 2"),
    (["--memory-share", "1.5"], "--memory-share 1.5"),
    (["--device", "tpu"], "unknown --device"),
])
def test_bad_input_is_refused(bench, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick", "--output", str(tmp_path / "out")] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
