"""Inference arithmetic for GPT-Neo: what a forward pass computes and reads, and the
fastest this machine could run it.

    python -m spec_stream.arithmetic --model tiny                  # a built-in size
    python -m spec_stream.arithmetic --model checkpoints/e2e_nlg-tiny --batch 16
    python -m spec_stream.arithmetic --model DIR_OR_CONFIG_JSON --dtype bfloat16 --no-probe

From a config (ours or upstream's): parameters (checked against the model built on the
meta device), weight bytes per dtype, FLOPs per token for prefill and decode, KV-cache
bytes, arithmetic intensity. With the machine's measured memory read rate and matmul
throughput in the weights' dtype (`measure_machine`), the time per token each one allows: a decode step reads
every weight once however many rows it carries, so batch 1 is memory-bound and a larger
batch moves the step toward the compute bound (`predicted_bound`).

Counting conventions, used everywhere below:
- a multiply-add is 2 FLOPs; biases, norms, softmax and GELU are left out (well under 1%);
- attention is dense: every row against every cached key and every row of the call in
  its layer; local layers mask the keys outside their window, tree steps the nodes off a
  row's branch, but eager and SDPA with a mask still compute them;
- prefill projects only its last row to the vocabulary (`generate` keeps one row of logits);
- the KV cache holds keys and values of every layer for every token (upstream's and our
  caches keep the local layers' old keys too) in the compute dtype, fp32 for int8 weights;
- int8 means what the `int8` engine stores: the linear layers' weight matrices (LM head
  included) in int8, embeddings, biases and norms in fp32; scales (under 1%) are left out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from spec_stream import GPTNeoConfig, GPTNeoForCausalLM
from spec_stream.checkpoints import MODEL_SIZES, check_path_text, check_result_file, default_stream_layers
from spec_stream.defaults import ARITHMETIC_BATCH, ARITHMETIC_CONTEXT, NUM_SPEC_STREAMS, PROBE_REPEATS
from spec_stream.errors import UserError, exit_on_user_error
from spec_stream.timing import resolve_device, synchronize

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a GPT-Neo config that size its compute and memory."""

    vocab: int
    positions: int
    hidden: int
    layers: int
    inner: int  # MLP width
    streams: int  # speculative streams (0: plain GPT-Neo)
    stream_layers: int  # top layers the stream rows run through
    tied: bool  # LM head shares the token embedding

    @classmethod
    def of(cls, config) -> "ModelShape":
        return cls(
            vocab=config.vocab_size, positions=config.max_position_embeddings, hidden=config.hidden_size,
            layers=config.num_layers, inner=config.intermediate_size or 4 * config.hidden_size,
            streams=getattr(config, "num_spec_streams", 0), stream_layers=getattr(config, "num_stream_layers", 0),
            tied=config.tie_word_embeddings,
        )


def parameter_groups(shape: ModelShape) -> dict[str, int]:
    """Parameters by kind; their sum is the model's parameter count."""
    h, i = shape.hidden, shape.inner
    return {
        "token_embedding": shape.vocab * h,
        "position_embedding": shape.positions * h,
        "block_matrices": shape.layers * (4 * h * h + 2 * h * i),  # q, k, v, out; c_fc, c_proj
        "block_vectors": shape.layers * (4 * h + h + i + h),  # ln_1, ln_2; out_proj, c_fc, c_proj biases
        "final_norm": 2 * h,
        "streams": shape.streams * h,  # P_j
        "lm_head": 0 if shape.tied else shape.vocab * h,
    }


def parameter_count(shape: ModelShape) -> int:
    return sum(parameter_groups(shape).values())


def model_parameter_count(config) -> int:
    """The parameters of the real model, built on the meta device (no memory, no init cost):
    ours for our config, upstream's for an upstream one."""
    model_class = GPTNeoForCausalLM if isinstance(config, GPTNeoConfig) else transformers.GPTNeoForCausalLM
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16', 'float16' or 'int8' from a torch dtype or a name."""
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)} (or fp32, bf16, fp16)")
    return name


def weight_bytes(shape: ModelShape, dtype) -> int:
    """Bytes the weights occupy in ``dtype`` (int8: see the module's conventions)."""
    groups = parameter_groups(shape)
    if dtype_name(dtype) != "int8":
        return sum(groups.values()) * DTYPE_BYTES[dtype_name(dtype)]
    matrices = groups["block_matrices"] + shape.vocab * shape.hidden  # the LM head gets its own int8 copy
    rest = sum(groups.values()) - groups["block_matrices"] - groups["lm_head"]
    return matrices + 4 * rest


def step_weight_bytes(shape: ModelShape, dtype) -> int:
    """Weight bytes one forward pass reads: every block, the final norm and the LM head;
    of the embeddings only a row per token (left out), of the streams nothing (a plain step)."""
    groups = parameter_groups(shape)
    matrices = groups["block_matrices"] + shape.vocab * shape.hidden
    vectors = groups["block_vectors"] + groups["final_norm"]
    name = dtype_name(dtype)
    return matrices * DTYPE_BYTES[name] + vectors * (4 if name == "int8" else DTYPE_BYTES[name])


def kv_bytes_per_token(shape: ModelShape, dtype) -> int:
    """Keys and values of one token in every layer, in the compute dtype (fp32 for int8)."""
    name = dtype_name(dtype)
    return 2 * shape.layers * shape.hidden * (4 if name == "int8" else DTYPE_BYTES[name])


def forward_flops(shape: ModelShape, new_tokens: int, past_tokens: int, logits_rows: int, stream_rows: int = 0) -> int:
    """FLOPs of one forward pass of one sequence: ``new_tokens`` rows through every layer,
    ``stream_rows`` more through the top ``stream_layers`` (a tree step's stream rows:
    streams x nodes), ``logits_rows`` rows projected to the vocabulary. Attention is dense:
    each row of a layer against the ``past_tokens`` cached keys and every row of the call in
    that layer (masks hide some; eager and SDPA with a mask compute them all)."""
    h = shape.hidden
    projections = 2 * (4 * h * h + 2 * h * shape.inner)  # per row and layer: q, k, v, out; c_fc, c_proj

    def layers(count: int, rows: int) -> int:
        return count * rows * (projections + 2 * 2 * h * (past_tokens + rows))  # QK^T and AV

    stream_layers = shape.stream_layers if stream_rows else 0
    total = layers(shape.layers - stream_layers, new_tokens) + layers(stream_layers, new_tokens + stream_rows)
    return total + 2 * h * shape.vocab * logits_rows


def forward_bytes(shape: ModelShape, dtype, new_tokens: int, past_tokens: int, batch: int = 1) -> int:
    """Bytes one forward pass of ``batch`` sequences at least moves: the weights once, and
    per sequence its cache read plus the new tokens' keys and values written."""
    per_sequence = kv_bytes_per_token(shape, dtype) * (past_tokens + 2 * new_tokens)
    return step_weight_bytes(shape, dtype) + batch * per_sequence


def decode_flops_per_token(shape: ModelShape, context: int) -> int:
    """One new token after ``context`` cached ones."""
    return forward_flops(shape, 1, context, logits_rows=1)


def prefill_flops_per_token(shape: ModelShape, prompt_tokens: int) -> float:
    return forward_flops(shape, prompt_tokens, 0, logits_rows=1) / prompt_tokens


def decode_intensity(shape: ModelShape, dtype, context: int, batch: int) -> float:
    """FLOPs per byte moved by a decode step of ``batch`` sequences at ``context``."""
    return batch * decode_flops_per_token(shape, context) / forward_bytes(shape, dtype, 1, context, batch)


@dataclass(frozen=True)
class MachineProbe:
    """What the device sustains, measured (`measure_machine`)."""

    device: str
    read_bytes_per_second: float  # bytes READ per second by a matrix-vector product (a decode step's pattern)
    copy_bytes_per_second: float  # a tensor copy, counting the bytes read AND the bytes written
    matmul_flops_per_second: float  # square matmul in ``matmul_dtype`` (int8: torch._int_mm)
    buffer_bytes: int  # size of the probes' buffers (far above the last-level cache)
    last_level_cache_bytes: int | None
    matmul_size: int
    threads: int
    matmul_dtype: str = "float32"


def last_level_cache_bytes(device: torch.device) -> int | None:
    """L2 of a GPU; on Linux the CPU's highest-level cache from sysfs; else None."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
    sizes = {}
    for cache in caches:
        try:
            level, size = int((cache / "level").read_text()), (cache / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes[level] = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    return sizes[max(sizes)] if sizes else None


def median_seconds(run, device: torch.device, repeats: int) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def probe_buffer_bytes(device: torch.device, cache: int | None) -> int:
    """16x the last-level cache, at least 256 MiB (1 GiB on a GPU), at most 1/8 of free memory."""
    floor = 2**30 if device.type == "cuda" else 2**28
    wanted = max(floor, 16 * (cache or 0))
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return min(wanted, free // 8)


def memory_rates(device: torch.device, buffer_bytes: int, repeats: int) -> tuple[float, float, int]:
    """(bytes read per second by a matrix-vector product, bytes read + written per second by
    a copy, the buffer's exact size) over one fp32 buffer of about ``buffer_bytes``."""
    columns = 4096
    matrix = torch.ones(buffer_bytes // (4 * columns), columns, device=device)
    vector = torch.ones(columns, device=device)
    target = torch.empty_like(matrix)
    nbytes = matrix.numel() * 4
    read = nbytes / median_seconds(lambda: torch.mv(matrix, vector), device, repeats)
    copy = 2 * nbytes / median_seconds(lambda: target.copy_(matrix), device, repeats)
    return read, copy, nbytes


def matmul_rate(device: torch.device, dtype, n: int, repeats: int) -> float:
    """FLOPs per second of an (n x n) @ (n x n) product in ``dtype`` (int8: `torch._int_mm`)."""
    if dtype_name(dtype) == "int8":
        a, b = (torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device) for _ in range(2))
        return 2 * n**3 / median_seconds(lambda: torch._int_mm(a, b), device, repeats)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype_name(dtype))) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, device, repeats)


def measure_machine(device="cpu", repeats: int = PROBE_REPEATS, buffer_bytes: int | None = None,
                    matmul_size: int | None = None, matmul_dtype="float32") -> MachineProbe:
    """Short probes (about a second on a CPU): memory read rate, copy rate, and the matmul
    rate in ``matmul_dtype`` (the dtype the weights compute in: half and int8 kernels can
    run several times faster than fp32)."""
    device = torch.device(device)
    cache = last_level_cache_bytes(device)
    read, copy, nbytes = memory_rates(device, buffer_bytes or probe_buffer_bytes(device, cache), repeats)
    n = matmul_size or (8192 if device.type == "cuda" else 2048)
    return MachineProbe(
        device=str(device), read_bytes_per_second=read, copy_bytes_per_second=copy,
        matmul_flops_per_second=matmul_rate(device, matmul_dtype, n, repeats), buffer_bytes=nbytes,
        last_level_cache_bytes=cache, matmul_size=n, threads=torch.get_num_threads(),
        matmul_dtype=dtype_name(matmul_dtype),
    )


def roofline_seconds(flops: float, nbytes: float, probe: MachineProbe) -> dict[str, float | str]:
    """The two lower bounds on a step's time and the one that binds."""
    memory = nbytes / probe.read_bytes_per_second
    compute = flops / probe.matmul_flops_per_second
    return {"memory_seconds": memory, "compute_seconds": compute, "seconds": max(memory, compute),
            "bound": "memory" if memory >= compute else "compute"}


def predicted_bound(config, dtype, batch: int, device_probe: MachineProbe,
                    context: int = ARITHMETIC_CONTEXT) -> dict[str, float | str]:
    """Lower bound on greedy decoding's seconds per token (per sequence: a step of ``batch``
    sequences over its tokens) at ``context`` cached tokens, and which bound binds. For the
    benchmark: an engine's measured time per token beside the fastest the machine allows."""
    shape = ModelShape.of(config)
    flops = batch * decode_flops_per_token(shape, context)
    step = roofline_seconds(flops, forward_bytes(shape, dtype, 1, context, batch), device_probe)
    per_token = {key: value / batch for key, value in step.items() if key != "bound"}
    return {**per_token, "bound": step["bound"], "step_seconds": step["seconds"],
            "tokens_per_second": 1 / per_token["seconds"], "intensity": decode_intensity(shape, dtype, context, batch)}


def ridge_batch(shape: ModelShape, dtype, context: int, probe: MachineProbe) -> float | None:
    """The batch at which decoding turns compute-bound: B x F / R = (W + B x K) / bw; None
    when the per-sequence cache traffic alone outweighs the compute."""
    weights = step_weight_bytes(shape, dtype) / probe.read_bytes_per_second
    per_sequence = (decode_flops_per_token(shape, context) / probe.matmul_flops_per_second
                    - (forward_bytes(shape, dtype, 1, context) - step_weight_bytes(shape, dtype))
                    / probe.read_bytes_per_second)
    return weights / per_sequence if per_sequence > 0 else None


def size_config(size: str) -> GPTNeoConfig:
    """A built-in size as the default recipe builds it: NUM_SPEC_STREAMS streams in the top
    half of the layers (the E2E-NLG and DialogSum share; it does not change the count)."""
    shape = {key: value for key, value in MODEL_SIZES[size].items() if key != "tokenizer_vocab"}
    layers = default_stream_layers("e2e_nlg", shape["num_layers"])
    return GPTNeoConfig(**shape, num_spec_streams=NUM_SPEC_STREAMS, num_stream_layers=layers,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)  # the from-scratch tokenizer's ids


def load_config(model: str) -> GPTNeoConfig:
    """A built-in size, a checkpoint folder, a config.json, or a hub id (online only)."""
    if model in MODEL_SIZES:
        return size_config(model)
    fix = f"pass a built-in size ({', '.join(MODEL_SIZES)}), a checkpoint folder or a GPT-Neo config.json"
    check_path_text(model, "--model")
    path = Path(model)
    hub_id = model.count("/") == 1 and not path.exists()  # owner/name, read online (or from the hub cache)
    if not hub_id and not (path.is_file() or (path / "config.json").is_file()):
        raise UserError(f"{model!r} is neither a built-in size nor a config.json or a folder holding one; {fix}")
    try:
        raw, _ = transformers.PretrainedConfig.get_config_dict(model)
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or ["unreadable"])[0][:160]
        raise UserError(f"cannot read a model config from {model!r} ({reason}); {fix}") from None
    if raw.get("model_type") != "gpt_neo":
        raise UserError(f"{model!r} holds a {raw.get('model_type')!r} config, not GPT-Neo; {fix}")
    try:
        return GPTNeoConfig.from_dict(raw)
    except (ValueError, TypeError) as error:
        raise UserError(f"{model!r} holds an invalid GPT-Neo config ({error}); {fix}") from None


def report(config, dtype, batch: int, context: int, probe: MachineProbe | None) -> dict:
    """Every figure of the module for one config, as a JSON-ready dict."""
    shape = ModelShape.of(config)
    figures = {
        "shape": asdict(shape), "dtype": dtype_name(dtype), "batch": batch, "context": context,
        "parameters": {"formula": parameter_count(shape), "model": model_parameter_count(config),
                       "groups": parameter_groups(shape)},
        "weight_bytes": {name: weight_bytes(shape, name) for name in DTYPE_BYTES},
        "step_weight_bytes": step_weight_bytes(shape, dtype),
        "flops_per_token": {"prefill": prefill_flops_per_token(shape, context),
                            "decode": decode_flops_per_token(shape, context)},
        "kv_cache_bytes": {"per_token": kv_bytes_per_token(shape, dtype),
                           "full_context": kv_bytes_per_token(shape, dtype) * shape.positions},
        "intensity": {"batch_1": decode_intensity(shape, dtype, context, 1),
                      f"batch_{batch}": decode_intensity(shape, dtype, context, batch)},
        "machine": None, "bounds": None,
    }
    if probe is not None:
        prefill = roofline_seconds(forward_flops(shape, context, 0, 1), forward_bytes(shape, dtype, context, 0), probe)
        figures.update(machine=asdict(probe), bounds={
            "machine_balance_flops_per_byte": probe.matmul_flops_per_second / probe.read_bytes_per_second,
            "decode_batch_1": predicted_bound(config, dtype, 1, probe, context),
            f"decode_batch_{batch}": predicted_bound(config, dtype, batch, probe, context),
            "prefill_per_token": {k: v / context if k != "bound" else v for k, v in prefill.items()},
            "ridge_batch": ridge_batch(shape, dtype, context, probe),
        })
    return figures


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _bound_line(label: str, bound: dict) -> str:
    return (f"{label}: memory {bound['memory_seconds'] * 1e3:.3g} ms/token, compute "
            f"{bound['compute_seconds'] * 1e3:.3g} ms/token -> {bound['bound']}-bound, "
            f"at most {bound.get('tokens_per_second', 1 / bound['seconds']):.4g} tokens/s")


def print_report(name: str, figures: dict) -> None:
    params, dtype, batch = figures["parameters"], figures["dtype"], figures["batch"]
    check = "matches" if params["formula"] == params["model"] else "DIFFERS FROM"
    lines = [
        f"model {name}: {figures['shape']}",
        f"parameters: {params['formula']:,} (formula; {check} the model built on the meta device: {params['model']:,})",
        "weight bytes: " + ", ".join(f"{k} {_si(v, 'B')}" for k, v in figures["weight_bytes"].items()),
        f"weights read per forward pass ({dtype}): {_si(figures['step_weight_bytes'], 'B')}",
        f"FLOPs per token ({figures['context']} tokens of context): prefill "
        f"{_si(figures['flops_per_token']['prefill'], 'FLOP')}, decode {_si(figures['flops_per_token']['decode'], 'FLOP')}",
        f"KV cache ({dtype}): {_si(figures['kv_cache_bytes']['per_token'], 'B')} per token, "
        f"{_si(figures['kv_cache_bytes']['full_context'], 'B')} for a full context of {figures['shape']['positions']}",
        "decode arithmetic intensity: " + ", ".join(f"{k.replace('_', ' ')} {v:.3g} FLOP/B"
                                                    for k, v in figures["intensity"].items()),
    ]
    machine, bounds = figures["machine"], figures["bounds"]
    if machine:
        lines += [
            f"machine ({machine['device']}, {machine['threads']} threads; buffers of {_si(machine['buffer_bytes'], 'B')}, "
            f"last-level cache {_si(machine['last_level_cache_bytes'] or 0, 'B')}): memory read "
            f"{_si(machine['read_bytes_per_second'], 'B/s')} (matrix-vector product, bytes read), copy "
            f"{_si(machine['copy_bytes_per_second'], 'B/s')} (bytes read + written), {machine['matmul_dtype']} matmul "
            f"{_si(machine['matmul_flops_per_second'], 'FLOP/s')} (n={machine['matmul_size']}); balance "
            f"{bounds['machine_balance_flops_per_byte']:.3g} FLOP/B",
            _bound_line("decode, batch 1", bounds["decode_batch_1"]),
            _bound_line(f"decode, batch {batch}", bounds[f"decode_batch_{batch}"]),
            _bound_line(f"prefill of {figures['context']} tokens", bounds["prefill_per_token"]),
            "decoding turns compute-bound at batch "
            + (f"{bounds['ridge_batch']:.3g}" if bounds["ridge_batch"] else "never (the KV-cache reads outweigh compute)"),
        ]
    print("\n".join(lines))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"a built-in size ({', '.join(MODEL_SIZES)}), a checkpoint folder or a GPT-Neo config.json")
    parser.add_argument("--dtype", default="float32", help=f"weights: {', '.join(DTYPE_BYTES)} (default float32)")
    parser.add_argument("--batch", type=int, default=ARITHMETIC_BATCH, help="sequences per decode step")
    parser.add_argument("--context", type=int, default=ARITHMETIC_CONTEXT,
                        help="tokens in the cache when decoding; also the prompt length of prefill")
    parser.add_argument("--device", default="cpu", help="where to probe the machine: cpu, cuda, cuda:N")
    parser.add_argument("--no-probe", dest="probe", action="store_false", help="skip the machine probes")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args(argv)
    args.dtype = dtype_name(args.dtype)
    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: a decode step carries at least 1 sequence")
    if args.context < 1:
        raise UserError(f"--context {args.context}: give at least 1 token of context")
    args.device = resolve_device(args.device)
    if args.json is not None:
        check_result_file(args.json, "--json", args.overwrite, "arithmetic.json")
    return args


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    config = load_config(args.model)
    if args.context >= config.max_position_embeddings:
        raise UserError(f"--context {args.context} leaves no room for a new token in the model's "
                        f"{config.max_position_embeddings} positions; lower --context")
    probe = measure_machine(args.device, matmul_dtype=args.dtype) if args.probe else None
    figures = report(config, args.dtype, args.batch, args.context, probe)
    print_report(args.model, figures)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
