"""Attention micro-benchmark: eager attention against torch's SDPA (and flash kernels
where they run), time and measured peak memory, swept over batch size and token count.

    python scripts/attention_bench.py                    # issue 13's sweep, JSON + 3 plots in results/attention
    python scripts/attention_bench.py --quick --output /tmp/attention   # a tiny sweep in seconds

Random Q, K, V of shape (batch, 1 head, tokens, embedding), embedding 400, float32 by
default; non-causal attention ``softmax(Q K^T / sqrt(E)) V``. Methods:

- eager: ``softmax((Q / sqrt(E)) @ K^T) @ V``, the (tokens x tokens) scores and
  probabilities materialised;
- sdpa: ``torch.nn.functional.scaled_dot_product_attention``, torch's own dispatch (on the
  CPU its flash kernel, which never holds the whole score matrix);
- flash: SDPA restricted to its flash kernel (on a GPU fp16/bf16 and embedding <= 256 only);
- flash_attn: the flash-attn package (CUDA, fp16/bf16, embedding <= 256), where installed.
A method that cannot run here is listed with the reason and left out.

Two sweeps: batch sizes at a fixed token count (memory and time against batch size) and
token counts at a fixed batch size (time against tokens). Each point: one call whose peak
memory is measured (CUDA: the allocator's peak over what was allocated before; CPU: the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before, with
freed heap memory returned first (glibc's malloc_trim) and, for that call, every block over
64 KiB in its own mapping (mallopt), so RSS follows the live tensors), then timed calls
(allocator back at its usual setting): median with min and max.
The memory each point needs is predicted first (inputs plus the formula beside each
measured figure, scaled up if an earlier point measured more than its formula); a point
that would not fit ``--memory-share`` of the memory free at the start is not run, and its
method's sweep stops there, said so in the JSON, the printout and the plots.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import importlib.util
import json
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from spec_stream.defaults import (ATTENTION_BATCHES, ATTENTION_EMBEDDING, ATTENTION_MEMORY_SHARE,  # noqa: E402
                                  ATTENTION_REPEATS, ATTENTION_SECONDS, ATTENTION_SWEEP_BATCH,
                                  ATTENTION_SWEEP_TOKENS, ATTENTION_TOKENS)
from spec_stream.checkpoints import check_output_path  # noqa: E402
from spec_stream.errors import UserError, exit_on_user_error  # noqa: E402
from spec_stream.cli_help import PlainDefaultsHelpFormatter, plain  # noqa: E402
from spec_stream.timing import resolve_device, synchronize  # noqa: E402

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: blocks above it get their own mapping
MIN_REPEATS = 3  # the fewest timed calls that give a median and a spread
QUICK = dict(tokens=(32, 64), embedding=16, batch_sizes=(2, 4, 8), sweep_tokens=64, sweep_batch=4, repeats=3)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_attention(q, k, v):
    return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def flash_sdpa_attention(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def flash_attn_attention(q, k, v):
    from flash_attn import flash_attn_func  # (batch, tokens, heads, dim) layout

    return flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


METHODS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash": flash_sdpa_attention,
           "flash_attn": flash_attn_attention}


def predicted_bytes(method: str, batch: int, tokens: int, embedding: int, itemsize: int) -> int:
    """Peak bytes a call allocates beyond its inputs. eager: the (tokens x tokens) scores
    beside the scaled Q, then beside the probabilities (softmax), then the probabilities
    beside the output; the fused kernels: the output and a float32 log-sum-exp per row."""
    if method == "eager":
        return batch * itemsize * tokens * (tokens + max(tokens, embedding))
    return batch * tokens * (itemsize * embedding + 4)


def input_bytes(batch: int, tokens: int, embedding: int, itemsize: int) -> int:
    return 3 * batch * tokens * embedding * itemsize


class PeakMemory:
    """Peak memory of a call above what was in use before it (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6") if device.type == "cpu" else None
        if device.type == "cuda":
            self.description = "CUDA allocator: torch.cuda.max_memory_allocated over memory_allocated before the call"
        elif self._resettable():
            self.description = ("process peak RSS (VmHWM, reset through /proc/self/clear_refs) over the RSS before "
                                "the call; glibc: malloc_trim before, blocks over 64 KiB mapped alone during it")
        else:
            raise UserError("measuring CPU memory needs Linux's /proc/self/clear_refs (peak RSS reset); run on "
                            "Linux or on a GPU (--device cuda)")

    @staticmethod
    def _resettable() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _status(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        if hasattr(self.libc, "malloc_trim"):
            self.libc.malloc_trim(0)  # hand freed heap memory back, so RSS counts what is in use
            self.libc.mallopt(M_MMAP_THRESHOLD, 64 * 2**10)  # each block > 64 KiB its own mapping: RSS = live
        self.before = self._status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.before
        if hasattr(self.libc, "mallopt"):  # timed calls: glibc's largest default, blocks reused from the heap
            self.libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        return self._status("VmHWM") - self.before


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def method_status(name: str, device: torch.device, dtype: torch.dtype, embedding: int) -> str | None:
    """None when ``name`` runs here at this dtype and embedding; else why it does not."""
    if name == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    probe = torch.randn(1, 1, 16, embedding, device=device, dtype=dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA explains a refused kernel in warnings, then raises
            METHODS[name](probe, probe, probe)
    except (RuntimeError, ValueError, ImportError) as error:  # no kernel for this device, dtype or width
        return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return None


def measure_point(method: str, batch: int, tokens: int, args, memory: PeakMemory) -> dict:
    """One call with its peak memory measured, then timed calls (at least MIN_REPEATS, at
    most ``args.repeats``, fewer once they pass ``args.max_seconds``)."""
    attention = METHODS[method]
    shape = (batch, 1, tokens, args.embedding)
    q, k, v = (torch.randn(shape, device=args.device, dtype=args.dtype) for _ in range(3))
    memory.start()
    peak = memory.peak() if attention(q, k, v) is not None else 0  # the output lives until the peak is read
    times = []
    while len(times) < args.repeats and (len(times) < MIN_REPEATS or sum(times) < args.max_seconds):
        synchronize(args.device)
        start = time.perf_counter()
        attention(q, k, v)
        synchronize(args.device)
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "median_seconds": statistics.median(times), "min_seconds": min(times),
            "max_seconds": max(times), "repeats": len(times), "seconds": times}


def out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "memory" in str(error).lower()


def run_sweep(points: list[tuple[int, int]], methods: list[str], args, memory: PeakMemory, limit: int) -> list[dict]:
    """Every method over ``points`` (batch, tokens), in order; a method stops at the first
    point that would not fit ``limit`` bytes (or that the allocator refuses)."""
    itemsize = torch.empty((), dtype=args.dtype).element_size()
    rows = []
    for method in methods:
        scale = 1.0  # measured over predicted so far: predictions only grow with it
        for batch, tokens in points:
            predicted = predicted_bytes(method, batch, tokens, args.embedding, itemsize)
            inputs = input_bytes(batch, tokens, args.embedding, itemsize)
            row = {"method": method, "batch": batch, "tokens": tokens, "predicted_bytes": predicted,
                   "input_bytes": inputs}
            needed = inputs + predicted * scale
            if needed > limit:
                row["status"] = (f"not run: needs about {needed / 2**30:.2f} GiB, over the limit of "
                                 f"{limit / 2**30:.2f} GiB (out of memory); the sweep stops here")
            else:
                try:
                    row.update(measure_point(method, batch, tokens, args, memory), status="ok")
                except RuntimeError as error:
                    if not out_of_memory(error):
                        raise
                    row["status"] = f"out of memory ({str(error).splitlines()[0][:120]}); the sweep stops here"
            rows.append(row)
            print(point_line(row), flush=True)
            if row["status"] != "ok":
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
                break
            scale = max(scale, row["peak_bytes"] / predicted)
    return rows


def point_line(row: dict) -> str:
    where = f"{row['method']:>10}  batch {row['batch']:>4}  tokens {row['tokens']:>5}: "
    if row["status"] != "ok":
        return where + row["status"]
    return (where + f"{row['median_seconds'] * 1e3:9.2f} ms (min {row['min_seconds'] * 1e3:.2f}, max "
            f"{row['max_seconds'] * 1e3:.2f}, {row['repeats']} calls), peak {row['peak_bytes'] / 2**20:8.1f} MiB "
            f"(formula {row['predicted_bytes'] / 2**20:.1f} MiB, inputs {row['input_bytes'] / 2**20:.1f} MiB)")


def curve_label(method: str, rows: list[dict], x_key: str) -> str:
    stopped = [r for r in rows if r["status"] != "ok"]
    return method + (f" (stops at {x_key} {stopped[0][x_key]}: out of memory)" if stopped else "")


def plot_sweep(rows: list[dict], x_key: str, y_key: str, path: Path, title: str) -> None:
    """One labelled curve per method (time: median with min-max bars; memory: measured, and
    the formula dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for index, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        done = [r for r in mine if r["status"] == "ok"]
        color, x = f"C{index}", [r[x_key] for r in done]
        label = curve_label(method, mine, x_key)
        if y_key == "memory":
            axes.plot(x, [r["peak_bytes"] / 2**20 for r in done], "o-", color=color, label=f"{label}, measured")
            axes.plot([r[x_key] for r in mine], [r["predicted_bytes"] / 2**20 for r in mine], "x--", color=color,
                      label=f"{method}, formula")
        else:
            median = [r["median_seconds"] * 1e3 for r in done]
            spread = [[m - r["min_seconds"] * 1e3 for m, r in zip(median, done)],
                      [r["max_seconds"] * 1e3 - m for m, r in zip(median, done)]]
            axes.errorbar(x, median, yerr=spread, fmt="o-", color=color, capsize=3, label=label)
    if x_key == "batch":
        axes.set_xscale("log", base=2)
    axes.set_xticks(sorted({r[x_key] for r in rows}))
    axes.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes.set_yscale("log")
    axes.set_xlabel("batch size" if x_key == "batch" else "tokens")
    axes.set_ylabel("peak memory beyond the inputs (MiB)" if y_key == "memory" else "time per call (ms), min-max bars")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_plots(report: dict, output: Path) -> list[str]:
    settings = report["settings"]
    where = f"{report['machine']['device_name']}, {settings['dtype']}, embedding {settings['embedding']}"
    batch_title = f"attention, {settings['sweep_tokens']} tokens: {where}"
    plots = {
        "memory_vs_batch.png": (report["batch_sweep"], "batch", "memory", batch_title),
        "time_vs_batch.png": (report["batch_sweep"], "batch", "time", batch_title),
        "time_vs_tokens.png": (report["token_sweep"], "tokens", "time",
                               f"attention, batch {settings['sweep_batch']}: {where}"),
    }
    for name, (rows, x_key, y_key, title) in plots.items():
        plot_sweep(rows, x_key, y_key, output / name, title)
    return list(plots)


REPORT_NAME = "attention_bench.json"


def int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=PlainDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny sweep in seconds: " + " ".join(
        f"--{name.replace('_', '-')} {plain(value).replace(' ', '')}" for name, value in QUICK.items()))
    parser.add_argument("--tokens", type=int_list, default=ATTENTION_TOKENS, help="token counts of the token sweep")
    parser.add_argument("--embedding", type=int, default=ATTENTION_EMBEDDING, help="width of Q, K and V")
    parser.add_argument("--batch-sizes", type=int_list, default=ATTENTION_BATCHES, help="batch sizes of the batch sweep")
    parser.add_argument("--sweep-tokens", type=int, default=ATTENTION_SWEEP_TOKENS, help="tokens in the batch sweep")
    parser.add_argument("--sweep-batch", type=int, default=ATTENTION_SWEEP_BATCH, help="batch size in the token sweep")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of Q, K and V")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--repeats", type=int, default=ATTENTION_REPEATS, help=f"timed calls per point (>= {MIN_REPEATS})")
    parser.add_argument("--max-seconds", type=float, default=ATTENTION_SECONDS,
                        help=f"stop timing a point after {MIN_REPEATS} calls once its calls took this long")
    parser.add_argument("--memory-share", type=float, default=ATTENTION_MEMORY_SHARE,
                        help="run a point only if its predicted memory fits this share of the memory free at the start")
    parser.add_argument("--output", type=Path, default=Path("results/attention"), help="folder for the JSON and plots")
    parser.add_argument("--overwrite", action="store_true", help="replace the results an earlier run left in --output")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**QUICK)  # flags given beside --quick still win
        args = parser.parse_args(argv)
    return validate(args)


def validate(args: argparse.Namespace) -> argparse.Namespace:
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        raise UserError(f"unknown --methods {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.methods = args.methods.split(",")
    args.tokens, args.batch_sizes = sorted(set(args.tokens)), sorted(set(args.batch_sizes))  # a sweep stops going up
    if args.repeats < MIN_REPEATS:
        raise UserError(f"--repeats {args.repeats}: time at least {MIN_REPEATS} calls for a median and a spread")
    if min(args.embedding, args.sweep_tokens, args.sweep_batch) < 1:
        raise UserError("--embedding, --sweep-tokens and --sweep-batch must be positive")
    if not 0 < args.max_seconds < float("inf"):
        raise UserError(f"--max-seconds {args.max_seconds}: pass a finite number of seconds above 0")
    if not 0 < args.memory_share <= 0.9:
        raise UserError(f"--memory-share {args.memory_share}: use a share in (0, 0.9], leaving room for the rest")
    args.device = resolve_device(args.device)
    args.dtype = DTYPES[args.dtype]
    check_output_path(args.output)
    if (args.output / REPORT_NAME).exists() and not args.overwrite:
        raise UserError(f"--output {args.output} holds an earlier run's {REPORT_NAME}; pass --overwrite to replace it "
                        "and its plots, or choose another folder")
    return args


@exit_on_user_error
def main(argv=None) -> int:
    from spec_stream.benchmark.machine import machine_info

    args = parse_args(argv)
    memory = PeakMemory(args.device)
    statuses = {method: method_status(method, args.device, args.dtype, args.embedding) for method in args.methods}
    for method, reason in statuses.items():
        if reason:
            print(f"{method}: left out here ({reason})")
    runnable = [method for method, reason in statuses.items() if reason is None]
    if not runnable:
        raise UserError(f"none of --methods {','.join(args.methods)} runs on {args.device} in {args.dtype}; "
                        "add eager or sdpa")
    free = available_memory(args.device)
    limit = int(free * args.memory_share)
    machine = machine_info(args.device)
    machine["device_name"] = machine.get("gpu") or machine["cpu"]
    print(f"{machine['device_name']} ({args.device}, {machine.get('cpu_threads')} CPU threads): "
          f"{free / 2**30:.1f} GiB free, points limited to {limit / 2**30:.1f} GiB; memory: {memory.description}")
    started = time.perf_counter()
    batch_rows = run_sweep([(batch, args.sweep_tokens) for batch in args.batch_sizes], runnable, args, memory, limit)
    token_rows = run_sweep([(args.sweep_batch, tokens) for tokens in args.tokens], runnable, args, memory, limit)
    report = {
        "machine": machine, "memory_measure": memory.description, "memory_free_bytes": free,
        "memory_limit_bytes": limit, "methods": {m: reason or "runs" for m, reason in statuses.items()},
        "settings": {"dtype": str(args.dtype).removeprefix("torch."), "embedding": args.embedding,
                     "heads": 1, "causal": False, "tokens": args.tokens, "batch_sizes": args.batch_sizes,
                     "sweep_tokens": args.sweep_tokens, "sweep_batch": args.sweep_batch, "repeats": args.repeats,
                     "max_seconds": args.max_seconds, "memory_share": args.memory_share},
        "batch_sweep": batch_rows, "token_sweep": token_rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    report["plots"] = write_plots(report, args.output)
    report["wall_seconds"] = time.perf_counter() - started
    (args.output / REPORT_NAME).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.output / REPORT_NAME} and {', '.join(report['plots'])} "
          f"({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
