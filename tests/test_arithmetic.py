"""Inference arithmetic against the real thing: parameter counts of built models, FLOPs
counted by torch's FlopCounterMode, KV bytes of a real cache; the bounds by hand; the CLI."""
import json
import math

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from huggingface.transformers.internals import CACHE_FIELD
from spec_stream import GPTNeoConfig
from spec_stream.arithmetic import (MachineProbe, ModelShape, decode_flops_per_token, forward_bytes, forward_flops,
                                    kv_bytes_per_token, main, measure_machine, model_parameter_count,
                                    parameter_count, parameter_groups, predicted_bound, ridge_batch, size_config, step_weight_bytes,
                                    weight_bytes)
from spec_stream.checkpoints import MODEL_SIZES
from tests.helpers import tiny_config, tiny_model

UPSTREAM_125M = dict(hidden_size=768, num_layers=12, num_heads=12, attention_types=[[["global", "local"], 6]])
SMALL_UPSTREAM = dict(vocab_size=300, hidden_size=32, num_layers=4, num_heads=4, max_position_embeddings=128,
                      attention_types=[[["global", "local"], 2]], window_size=8, bos_token_id=0, eos_token_id=0)
PROBE = MachineProbe(device="cpu", read_bytes_per_second=20e9, copy_bytes_per_second=30e9,
                     matmul_flops_per_second=200e9, buffer_bytes=2**28, last_level_cache_bytes=2**25,
                     matmul_size=2048, threads=2)


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_parameter_count_of_every_built_in_size(size):
    config = size_config(size)
    assert config.num_spec_streams  # streams counted too
    assert parameter_count(ModelShape.of(config)) == model_parameter_count(config)
    plain = size_config(size)
    plain.num_spec_streams, plain.num_stream_layers = 0, 0
    assert parameter_count(ModelShape.of(plain)) == model_parameter_count(plain) < model_parameter_count(config)


@pytest.mark.parametrize("overrides", [
    {}, dict(num_spec_streams=2, num_stream_layers=1), dict(num_spec_streams=3, num_stream_layers=4),
    dict(tie_word_embeddings=False), dict(intermediate_size=40),
])
def test_parameter_count_of_our_variants(overrides):
    config = tiny_config(**overrides)
    assert parameter_count(ModelShape.of(config)) == model_parameter_count(config)


@pytest.mark.parametrize("fields", [{}, UPSTREAM_125M, dict(UPSTREAM_125M, tie_word_embeddings=False)])
def test_parameter_count_of_upstream_configs(fields):
    config = transformers.GPTNeoConfig(**fields)  # {}: upstream's defaults, the 1.3B shape
    assert parameter_count(ModelShape.of(config)) == model_parameter_count(config)


def test_gpt_neo_125m_has_its_published_count():
    assert parameter_count(ModelShape.of(transformers.GPTNeoConfig(**UPSTREAM_125M))) == 125_198_592


def test_flops_match_torch_flop_counter_for_prefill_decode_and_streams():
    config = transformers.GPTNeoConfig(**SMALL_UPSTREAM)
    model, shape = transformers.GPTNeoForCausalLM(config).eval(), ModelShape.of(config)
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad(), FlopCounterMode(display=False) as prefill:
        cache = getattr(model(ids, logits_to_keep=1, use_cache=True), CACHE_FIELD)
    assert prefill.get_total_flops() == forward_flops(shape, 20, 0, logits_rows=1)
    with torch.no_grad(), FlopCounterMode(display=False) as decode:
        model(ids[:, :1], use_cache=True, **{CACHE_FIELD: cache})
    assert decode.get_total_flops() == decode_flops_per_token(shape, 20)
    ours = tiny_model(num_spec_streams=3, num_stream_layers=2)  # eager attention, stream rows in 2 layers
    with torch.no_grad(), FlopCounterMode(display=False) as streams:
        ours(ids % 101, stream_positions="all")
    assert streams.get_total_flops() == forward_flops(ModelShape.of(ours.config), 20, 0, 4 * 20, stream_rows=3 * 20)


def test_kv_bytes_per_token_match_a_real_cache():
    config = transformers.GPTNeoConfig(**SMALL_UPSTREAM)
    model = transformers.GPTNeoForCausalLM(config).eval()
    with torch.no_grad():
        cache = getattr(model(torch.randint(0, 300, (1, 20)), use_cache=True), CACHE_FIELD)
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert stored == 20 * kv_bytes_per_token(ModelShape.of(config), "float32")
    assert kv_bytes_per_token(ModelShape.of(config), "bfloat16") * 2 == kv_bytes_per_token(ModelShape.of(config), "fp32")


def test_weight_bytes_per_dtype():
    shape = ModelShape.of(size_config("small"))
    count = parameter_count(shape)
    assert weight_bytes(shape, torch.float32) == 4 * count and weight_bytes(shape, "bf16") == 2 * count
    matrices = parameter_groups(shape)["block_matrices"]
    int8_head = shape.vocab * shape.hidden  # its own int8 copy beside the fp32 (tied) embedding
    assert weight_bytes(shape, "int8") == matrices + int8_head + 4 * (count - matrices)
    assert step_weight_bytes(shape, "int8") < step_weight_bytes(shape, "float16") < step_weight_bytes(shape, "float32")


def test_bounds_by_hand():
    config = GPTNeoConfig(**UPSTREAM_125M)
    shape = ModelShape.of(config)
    one = predicted_bound(config, "float32", 1, PROBE, context=256)
    flops, nbytes = decode_flops_per_token(shape, 256), forward_bytes(shape, "float32", 1, 256)
    assert one["memory_seconds"] == pytest.approx(nbytes / 20e9)
    assert one["compute_seconds"] == pytest.approx(flops / 200e9)
    assert one["bound"] == "memory" and one["tokens_per_second"] == pytest.approx(20e9 / nbytes)
    many = predicted_bound(config, "float32", 256, PROBE, context=256)
    assert many["bound"] == "compute" and many["seconds"] < one["seconds"]
    ridge = ridge_batch(shape, "float32", 256, PROBE)
    at_ridge = forward_bytes(shape, "float32", 1, 256, batch=ridge) / 20e9
    assert math.isclose(at_ridge, ridge * flops / 200e9, rel_tol=1e-9)


def test_machine_probe_runs_on_small_buffers():
    probe = measure_machine("cpu", repeats=2, buffer_bytes=2**22, matmul_size=128)
    assert probe.read_bytes_per_second > 0 and probe.copy_bytes_per_second > 0
    assert probe.matmul_flops_per_second > 0 and probe.buffer_bytes == 2**22 and probe.matmul_size == 128
    assert probe.matmul_dtype == "float32"
    int8 = measure_machine("cpu", repeats=2, buffer_bytes=2**22, matmul_size=128, matmul_dtype="int8")
    assert int8.matmul_dtype == "int8" and int8.matmul_flops_per_second > 0


def test_cli_writes_every_figure(tmp_path, capsys):
    output = tmp_path / "tiny.json"
    assert main(["--model", "tiny", "--no-probe", "--batch", "4", "--json", str(output)]) == 0
    figures = json.loads(output.read_text())
    # 2048 * 64 + 1024 * 64 (embeddings) + 4 * (4 * 64 * 64 + 2 * 64 * 256) + 4 * 640 (blocks) + 128 (ln_f) + 3 * 64
    assert figures["parameters"]["formula"] == figures["parameters"]["model"] == 396_096
    assert set(figures["intensity"]) == {"batch_1", "batch_4"} and figures["machine"] is None
    assert "matches the model" in capsys.readouterr().out


def test_cli_reads_an_upstream_checkpoint_folder(tmp_path, capsys):
    transformers.GPTNeoConfig(**SMALL_UPSTREAM).save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--no-probe", "--context", "64"]) == 0
    assert "matches the model" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-size"], "neither a built-in size"),
    (["--model", "tiny", "--dtype", "int4"], "unknown dtype"),
    (["--model", "tiny", "--batch", "0"], "--batch 0"),
    (["--model", "tiny", "--context", "1024"], "leaves no room"),
    (["--model", "tiny", "--device", "gpu"], "unknown --device"),
])
def test_cli_refuses_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--no-probe"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_cli_refuses_a_config_of_another_model(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--no-probe"])
    assert "not GPT-Neo" in capsys.readouterr().err
