"""scripts/generate_vs_benchmark.py: a user's ``generate()`` beside the benchmark's row."""
import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generate_vs_benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("generate_vs_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_row_equals_plain_decoding_and_the_ratios_are_printed(finetuned_checkpoint, data_dir, monkeypatch,
                                                                   capsys):
    """The script's rows on a tiny checkpoint: every output equals plain decoding (exit 0),
    one line per way of calling, the two ratios named. torch.compile is made the identity
    here (what it compiles is checked in tests/test_fixed_shape.py): the script's own logic
    is what runs; every tree costs one step (no probe)."""
    from huggingface.transformers.generation import tree_search

    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    monkeypatch.setattr(tree_search, "probe_step_seconds", lambda model, **kwargs: {(): 1.0, (8, 4, 2): 1.0})
    script = load_script()
    code = script.main(["--model", str(finetuned_checkpoint[0]), "--data-dir", str(data_dir), "--num-samples", "3",
                        "--max-new-tokens", "12", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("generate()", "generate(compile_config)", "benchmark eager", "benchmark compiled", "plain"):
        assert f"  {row} " in out and "= plain: 3/3" in out.split(f"  {row} ")[1].splitlines()[0]
    assert "generate() / benchmark eager:" in out and "generate(compile_config) / benchmark compiled:" in out
    assert "GFLOP/s" in out


def test_bad_counts_exit_2(capsys):
    script = load_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", "x", "--repeats", "0"])
    assert exit_info.value.code == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
