"""Tokens/sec and acceptance of spec-stream against baseline engines and peers.

    python dataset_tps.py --model_type spec_stream            # spec_stream vs naive and static, all datasets
    python dataset_tps.py --model_type all --dataset e2e_nlg --data-dir ../shared/datasets
    python dataset_tps.py --model_type naive,static,spec_stream --batch-size 1,2,4,8     # a batch sweep
    python dataset_tps.py --do-sample --temperature 0.7 --top-k 50 --seed 0             # sampling mode
    python dataset_tps.py --model runs/frozen --reference-model runs/base --dataset e2e_nlg

Batch 1 and greedy unless asked, the same prompts for every engine. Every argument, path
and checkpoint is checked before the first engine starts. Per engine and batch size: one
warm-up batch, then `--repeats` timed passes over the prompts (the median tokens/s is
reported with its spread). `naive` always runs first: the fp32 reference for speedup, on
`--reference-model` when given. "identical" compares each engine with greedy decoding of
its own model in its own dtype; the comparison with fp32 `naive` is a column of its own;
with `--do-sample` "identical" becomes a distribution check against naive's samples (see
`spec_stream.benchmark`). Quality, SQL validity (Spider) and repeated 4-grams are reported
beside the speed. Prints a table and writes every figure (and the machine) to a JSON file;
`scripts/plot_results.py` plots it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from spec_stream import defaults
from spec_stream.arithmetic import measure_machine
from huggingface.transformers.generation.speculative_tree import AUTO, TreeSpec, parse_tree
from spec_stream.benchmark.inputs import check_draft_model, check_room, check_tree_depth, prepare_task, uses_streams
from spec_stream.benchmark.machine import cpu_l3, cpu_name, machine_info
from spec_stream.benchmark.recipe import default_checkpoint, default_context, prepared_checkpoint
from spec_stream.benchmark.settings import REPORT_SCHEMA_VERSION, BenchmarkSettings
from spec_stream.benchmark.task import benchmark_task
from spec_stream.checkpoints import check_path_text, check_result_file
from spec_stream.cli_help import PlainDefaultsHelpFormatter, per_device
from spec_stream.engines import ENGINE_NAMES, ENGINES, engines_for
from spec_stream.data import is_preset, resolve_dataset
from spec_stream.errors import UserError, exit_on_user_error
from spec_stream.timing import resolve_device


TERMINAL_WIDTH = 120  # the default table fits a terminal this wide; --wide prints every column
WIDE_WIDTH = 300
QUALITY_WIDTH = 30  # the default table's quality column (a skipped row's reason) wraps beyond this


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=PlainDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model_type", "--model-type", default="spec_stream",
        help=f"one of {', '.join(ENGINE_NAMES)}, a comma-separated list, or all (naive always runs; "
        "spec_stream brings static, its one-token step)")
    add("--dataset", default="all", help=f"a preset ({', '.join(defaults.DATASETS)}), all, or your own data: a .jsonl, "
        ".json, .csv or .parquet file, a folder of them, or a hub dataset id (with --prompt-template and "
        "--response-field); quality is then ROUGE-L and BLEU against the response")
    add("--prompt-template", default=None, help="your own data: a row's prompt, str.format over its columns, e.g. "
        "'Question: {question}\\nAnswer:'")
    add("--response-field", default=None, help="your own data: the column holding the reference response")
    add("--response-template", default=None, help="your own data: the reference as a template instead")
    add("--model", default=None, help="fine-tuned checkpoint folder or hub id; default: one per dataset, "
        "prepared once under --checkpoint-dir")
    add("--checkpoint-dir", default=defaults.CHECKPOINT_DIR, help="where default checkpoints live")
    add("--data-dir", default=os.environ.get("SPEC_STREAM_DATA_DIR"),
        help="local JSON-lines copies laid out like shared/datasets (default: the hub)")
    add("--split", "--test-split", default=None, help="benchmark split (default: test; validation for spider; "
        "a single file of your own is split 80/10/10 into train, validation and test by a fixed-seed hold-out)")
    add("--num-samples", type=int, default=None, help=f"prompts per dataset (default: {per_device(defaults.NUM_SAMPLES)})")
    add("--max-new-tokens", type=int, default=None,
        help=f"new tokens per prompt at most (default: {per_device(defaults.MAX_NEW_TOKENS)})")
    add("--repeats", type=int, default=defaults.REPEATS, help="timed passes over the prompts per engine")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add("--output", default=defaults.REPORT_PATH, help="JSON file for every figure (an existing one: --overwrite)")
    add("--overwrite", action="store_true", help="replace an existing --output file")
    add("--half-dtype", choices=("fp16", "bf16"), default=defaults.HALF_DTYPE,
        help="the dtype of the half-precision engine (half)")
    add("--draft-model", default=None, help="small GPT-Neo draft model for the assisted engine")
    add("--tree-widths", default=defaults.BENCHMARK_TREE_WIDTHS,
        help="spec_stream tree: top-k per stream, one width per level (e.g. 4,3,2), or auto: the tree with "
             "the most expected tokens/s from the checkpoint's acceptance rates and this device's step latency")
    add("--lookup-branch", type=int, default=None,
        help="spec_stream: prompt-lookup nodes added to its tree (0: none); default per dataset: "
             + ", ".join(f"{task} {n}" for task, n in defaults.LOOKUP_BRANCH.items()))
    add("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
        help="run static/spec_stream steps eagerly on a GPU (default: one CUDA graph per step)")
    add("--batch-size", default=",".join(map(str, defaults.BENCHMARK_BATCH_SIZES)),
        help="prompts per batch (left-padded); a comma-separated list such as 1,2,4,8 runs every engine at each")
    add("--reference-model", default=None, help="the checkpoint --model came from (e.g. the base of a frozen-base "
        "fine-tuning), loaded with upstream transformers: what naive runs and every engine is compared with")
    add("--do-sample", action="store_true", help="every engine samples (same warpers and seeds) instead of greedy")
    add("--temperature", type=float, default=None, help=f"with --do-sample; default {defaults.SAMPLE_TEMPERATURE}")
    add("--top-k", type=int, default=None, help=f"with --do-sample, 0 for off; default {defaults.SAMPLE_TOP_K}")
    add("--top-p", type=float, default=None, help=f"with --do-sample, 1 for off; default {defaults.SAMPLE_TOP_P}")
    add("--seed", type=int, default=None, help=f"with --do-sample: prompt i samples with seed SEED + i; default "
        f"{defaults.SAMPLE_SEED}")
    add("--wide", action="store_true", help=f"print every column of the tables (about {WIDE_WIDTH} characters "
        f"wide); without it they fit {TERMINAL_WIDTH} (the JSON report holds every figure either way)")
    return parser


RENAMED_ENGINES = {"batched": "naive at batch B is upstream batched greedy: pass --batch-size 1,4,16"}


def resolve_engines(model_type: str, draft_model: str | None, device: torch.device) -> tuple[str, ...]:
    """The engines to run, `naive` first. `all` means every engine that runs on ``device``
    (`assisted` only with a draft model, `compiled` only where torch.compile can compile);
    `spec_stream` brings `static`, the same decoder with the one-token step."""
    requested = engines_for(device) if model_type == "all" else tuple(t.strip() for t in model_type.split(","))
    renamed = [t for t in requested if t in RENAMED_ENGINES]
    if renamed:
        raise UserError(f"--model_type {renamed[0]} is gone: {RENAMED_ENGINES[renamed[0]]}")
    unknown = [t for t in requested if t not in ENGINE_NAMES]
    if unknown:
        raise UserError(f"unknown --model_type {', '.join(unknown)}; choose from {', '.join(ENGINE_NAMES)} or all")
    elsewhere = [t for t in requested if device.type not in ENGINES[t].devices]
    if elsewhere:
        raise UserError(f"--model_type {', '.join(elsewhere)} cannot run on {device.type}; drop it or pass "
                        f"--device {ENGINES[elsewhere[0]].devices[0]}")
    if "assisted" in requested and not draft_model:
        if model_type != "all":
            raise UserError("the assisted engine needs a small GPT-Neo draft model: pass --draft-model PATH_OR_ID")
        requested = tuple(t for t in requested if t != "assisted")
    unavailable = {t: reason for t in requested if (reason := ENGINES[t].unavailable(device)) is not None}
    for name, reason in unavailable.items():
        if model_type != "all":
            raise UserError(f"{reason}; drop {name} from --model_type")
        print(f"--model_type all: leaving out {name}: {reason}")
    requested = tuple(t for t in requested if t not in unavailable)
    if "spec_stream" in requested and "static" not in requested:  # its one-token step, so a tree that
        requested = ("static",) + requested  # does not pay shows in the same run
    return ("naive",) + tuple(t for t in dict.fromkeys(requested) if t != "naive")


def parse_tree_widths(text: str) -> TreeSpec | str:
    """--tree-widths: "auto" or concrete widths (`parse_tree`, the one parser of trees)."""
    try:
        return parse_tree(text)
    except ValueError as error:
        raise UserError(f"--tree-widths: {error}") from None


def check_tree_size(tree: TreeSpec | str, lookup_branch: int | None) -> None:
    """The spec_stream tree with the largest lookup chain it may get (--lookup-branch, else
    the datasets' largest default) must stay within the node limit a step can hold."""
    if tree == AUTO:
        return
    lookup = max(defaults.LOOKUP_BRANCH.values()) if lookup_branch is None else lookup_branch
    try:
        TreeSpec(tree.widths, lookup)
    except ValueError as error:
        flags = "--tree-widths" if lookup_branch is None else "--tree-widths with --lookup-branch"
        raise UserError(f"{flags}: {error}") from None


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """--batch-size: one size or a comma-separated sweep, ascending, each at least 1."""
    try:
        sizes = sorted({int(size) for size in text.split(",")})
    except ValueError:
        raise UserError(f"--batch-size {text!r}: give an integer or comma-separated integers like 1,2,4,8") from None
    if sizes[0] < 1:
        raise UserError(f"--batch-size {text}: a batch holds at least 1 prompt; pass sizes of 1 or more")
    return tuple(sizes)


def parse_sampling(args: argparse.Namespace) -> dict:
    """The sampling settings (defaults filled in) with --do-sample; none without it."""
    given = {"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p, "--seed": args.seed}
    if not args.do_sample:
        flags = [flag for flag, value in given.items() if value is not None]
        if flags:
            raise UserError(f"{flags[0]} sets sampling; add --do-sample (or drop {flags[0]} for greedy decoding)")
        return {}
    sampling = dict(
        temperature=defaults.SAMPLE_TEMPERATURE if args.temperature is None else args.temperature,
        top_k=defaults.SAMPLE_TOP_K if args.top_k is None else args.top_k,
        top_p=defaults.SAMPLE_TOP_P if args.top_p is None else args.top_p,
        seed=defaults.SAMPLE_SEED if args.seed is None else args.seed)
    if not 0 < sampling["temperature"] < float("inf"):
        raise UserError(f"--temperature {sampling['temperature']}: sampling needs a temperature above 0 and finite "
                        "(e.g. 0.7); for greedy decoding drop --do-sample")
    if not 0 < sampling["top_p"] <= 1:
        raise UserError(f"--top-p {sampling['top_p']}: pass a share above 0 and at most 1 (1 turns top-p off)")
    at_least("--top-k", sampling["top_k"], 0, "keep the k most likely tokens (0 turns top-k off)")
    at_least("--seed", sampling["seed"], 0, "prompt i samples with seed SEED + i")
    if sampling["seed"] >= defaults.SEED_LIMIT:
        raise UserError(f"--seed {sampling['seed']}: pass a seed from 0 to {defaults.SEED_LIMIT - 1}")
    return dict(do_sample=True, **sampling)


def at_least(flag: str, value: int, minimum: int, what: str) -> int:
    if value < minimum:
        raise UserError(f"{flag} {value}: {what}; pass at least {minimum}")
    return value


def resolve_datasets(args: argparse.Namespace) -> tuple:
    """--dataset with the template flags: the presets' names, or one dataset of the user's."""
    templates = (args.prompt_template, args.response_field, args.response_template)
    if args.dataset == "all":
        if templates != (None, None, None):
            raise UserError("--prompt-template, --response-field and --response-template describe your own data; "
                            "pass it with --dataset FILE_OR_HUB_ID instead of all")
        return defaults.DATASETS
    if args.prompt_template is None and not is_preset(args.dataset) and not Path(args.dataset).exists():
        raise UserError(f"unknown --dataset {args.dataset!r}; choose from {', '.join(defaults.DATASETS)} or all, or "
                        "name your own data (a .jsonl, .json, .csv or .parquet file or a hub dataset id) with "
                        "--prompt-template and --response-field")
    return (resolve_dataset(args.dataset, *templates),)


PATH_FLAGS = ("--dataset", "--model", "--checkpoint-dir", "--data-dir", "--split", "--output", "--draft-model",
              "--reference-model")  # values that name files or become part of a file's name


def parse_settings(argv=None) -> BenchmarkSettings:
    """The command line as checked settings; every bad value is a UserError."""
    args = build_parser().parse_args(argv)
    for flag in PATH_FLAGS:
        check_path_text(getattr(args, flag.lstrip("-").replace("-", "_")), flag)
    datasets = resolve_datasets(args)
    device = resolve_device(args.device)
    sized = "cuda" if device.type == "cuda" else "cpu"
    num_samples = defaults.NUM_SAMPLES[sized] if args.num_samples is None else args.num_samples
    max_new_tokens = defaults.MAX_NEW_TOKENS[sized] if args.max_new_tokens is None else args.max_new_tokens
    if args.reference_model and not args.model:
        raise UserError("--reference-model is the checkpoint --model came from; pass --model CHECKPOINT too")
    tree_widths = parse_tree_widths(args.tree_widths)
    lookup_branch = check_lookup_branch(args.lookup_branch, max_new_tokens)
    check_tree_size(tree_widths, lookup_branch)
    return BenchmarkSettings(
        engines=resolve_engines(args.model_type, args.draft_model, device),
        datasets=datasets,
        device=device,
        num_samples=at_least("--num-samples", num_samples, 1, "measure at least 1 sample per dataset"),
        max_new_tokens=at_least("--max-new-tokens", max_new_tokens, 1, "generate at least 1 token"),
        repeats=at_least("--repeats", args.repeats, 1, "time every prompt at least once (3 give a spread)"),
        tree_widths=tree_widths,
        half_dtype=torch.float16 if args.half_dtype == "fp16" else torch.bfloat16,
        output=Path(args.output), overwrite=args.overwrite, model=args.model, checkpoint_dir=Path(args.checkpoint_dir),
        data_dir=args.data_dir, split=args.split, draft_model=args.draft_model, cuda_graphs=args.cuda_graphs,
        reference_model=args.reference_model, batch_sizes=parse_batch_sizes(args.batch_size), **parse_sampling(args),
        lookup_branch=lookup_branch, wide_table=args.wide,
    )


def check_lookup_branch(nodes: int | None, max_new_tokens: int) -> int | None:
    """``--lookup-branch`` as given (None: each dataset's default), 0 to ``--max-new-tokens``:
    drafts past the last new token can never be emitted, and every node costs a row."""
    if nodes is None:
        return None
    at_least("--lookup-branch", nodes, 0, "pass 0 for no lookup branch, or the nodes of its chain")
    if nodes > max_new_tokens:
        raise UserError(f"--lookup-branch {nodes}: a chain longer than --max-new-tokens {max_new_tokens} drafts "
                        f"tokens that can never be emitted; pass at most {max_new_tokens}")
    return nodes


def check_output(output: Path, overwrite: bool = False) -> None:
    """Fail now, not after the benchmark: see `check_result_file`."""
    check_result_file(output, "--output", overwrite, "dataset_tps.json")


def write_report(report: dict, output: Path) -> None:
    """Write ``report`` to ``output`` in one rename; nothing is left behind on failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(report, indent=2))
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


def checkpoints_for(settings: BenchmarkSettings) -> dict[str, str | None]:
    """The checkpoint of each dataset that exists now: --model for all, else the default
    one once prepared (None: not yet; the tree is checked against the streams it will have)."""
    if settings.model:
        return {task: settings.model for task in settings.datasets}
    if uses_streams(settings.engines):
        check_tree_depth(settings.tree_widths, defaults.NUM_SPEC_STREAMS, "the default checkpoint")
    check_room(settings.max_new_tokens, default_context(settings.device))
    return {task: prepared_checkpoint(task, settings.device, settings.checkpoint_dir) for task in settings.datasets}


def tasks_as_ready(settings: BenchmarkSettings):
    """Each dataset's `TaskInputs`, in order, as soon as its checkpoint is ready: those that
    exist are checked before any work starts, a default one right after it is prepared."""
    existing = checkpoints_for(settings)
    checked = {task: prepare_task(task, checkpoint, settings) for task, checkpoint in existing.items() if checkpoint}
    for task in settings.datasets:
        if task not in checked:
            checkpoint = default_checkpoint(task, settings.device, settings.checkpoint_dir, settings.data_dir)
            checked[task] = prepare_task(task, str(checkpoint), settings)
        yield checked[task]


COLUMNS = ("dataset", "engine", "batch", "cut", "backend", "tok/s", "spread", "latency s", "ms/token / bound",
           "speedup", "tok/call", "accept", "identical", "= naive fp32", "BW share", "quality", "repeat 4-gram",
           "peak MB")


def exactness_cell(r: dict) -> str:
    """"identical": the share equal to greedy decoding, or with sampling the distribution check."""
    check = r["distribution_check"]
    if r["identical_to_greedy"] is not None:
        return f"{r['identical_to_greedy']:.0%}"
    if check is None:
        return "- (1 prompt)"
    outside = f", {check['tokens_outside_support']} tok outside" if check["tokens_outside_support"] else ""
    return f"{'pass' if check['passed'] else 'FAIL'} z={check['statistic']:+.2f}{outside}"


def acceptance_cell(r: dict) -> str:
    """Accepted drafts per draft position, and the share the lookup branch supplied."""
    if r["acceptance_rate"] is None:
        return "-"
    accepted = r["accepted_from_lookup"] + r["accepted_from_streams"]
    lookup = f" ({r['accepted_from_lookup'] / accepted:.0%} lookup)" if r["lookup_branch"] and accepted else ""
    return f"{r['acceptance_rate']:.2f}{lookup}"


def table_cells(r: dict) -> list[str]:
    spread = r["tokens_per_second_spread"]
    return [
        r["dataset"], r["engine"], str(r["batch_size"]), str(r["truncated_prompts"]), r["backend"],
        f"{r['tokens_per_second']:.1f}",
        f"{spread['min']:.1f}-{spread['max']:.1f} ({spread['iqr']:.1f})", f"{r['latency_seconds']:.3f}",
        f"{1e3 / r['tokens_per_second']:.2f} / {r['predicted_ms_per_token']['ms']:.2f} "
        f"{r['predicted_ms_per_token']['bound'][:3]}", f"{r['speedup_vs_naive']:.2f}x",
        f"{r['tokens_per_call']:.2f}", acceptance_cell(r),
        exactness_cell(r), f"{r['identical_to_naive']:.0%}", f"{r['bandwidth_share']:.1%}",
        ", ".join(f"{k} {v:.3g}" for k, v in r["quality"].items()), f"{r['repetition']:.0%}",
        f"{r['peak_memory_mb']:.0f}",
    ]


def skipped_cells(s: dict) -> list[str]:
    """A row for an engine that could not run at a batch size: the reason, no figures."""
    reason = f"not run: {s['reason']}"
    return [s["dataset"], s["engine"], str(s["batch_size"]), "-", reason] + ["-"] * (len(COLUMNS) - 5)


def compact_quality(quality: dict) -> str:
    return " ".join(f"{name} {value:.3g}" for name, value in quality.items())


def compact_cells(r: dict) -> list[str]:
    """The default table's cells: what tells engines apart, each kept short."""
    spread = r["tokens_per_second_spread"]
    identical = exactness_cell(r).split(",")[0]  # with sampling: pass/FAIL and z, tokens outside in --wide
    return [r["dataset"], r["engine"], str(r["batch_size"]),
            f"{r['tokens_per_second']:.0f} ({spread['min']:.0f}-{spread['max']:.0f})",
            f"{r['speedup_vs_naive']:.2f}x", f"{r['tokens_per_call']:.2f}", identical, compact_quality(r["quality"])]


COMPACT_COLUMNS = ("dataset", "engine", "batch", "tok/s (min-max)", "speedup", "tok/call", "identical", "quality")


def compact_skipped_cells(s: dict) -> list[str]:
    return [s["dataset"], s["engine"], str(s["batch_size"]), "not run", "-", "-", "-", s["reason"]]


def table_title(settings: BenchmarkSettings, wide: bool) -> str:
    if not wide:
        mode = f"sampling T {settings.temperature}" if settings.do_sample else "greedy"
        return f"tok/s: median of {settings.repeats} passes (min-max); {mode}; --wide: every column"
    mode = (f"sampling (T {settings.temperature}, top-k {settings.top_k}, top-p {settings.top_p}, seed "
            f"{settings.seed}; identical = distribution check)" if settings.do_sample else "greedy")
    return (f"dataset_tps: batch {','.join(map(str, settings.batch_sizes))}, {mode}; tok/s = median of "
            f"{settings.repeats} timed passes, spread = min-max (IQR); cut = prompts cut to fit the context")


def build_table(rows: list[dict], skipped: list[dict], settings: BenchmarkSettings) -> Table:
    """Every measured and skipped row, by dataset and batch size. The default (compact)
    table fits `TERMINAL_WIDTH` columns, showing the dataset and batch columns only where
    they vary; ``settings.wide_table``: every column of `COLUMNS`."""
    wide = settings.wide_table
    columns, cells, skipped_row = ((COLUMNS, table_cells, skipped_cells) if wide
                                   else (COMPACT_COLUMNS, compact_cells, compact_skipped_cells))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows + skipped))
    entries = [cells(r) for r in rows] + [skipped_row(s) for s in skipped]
    order = sorted(range(len(entries)), key=lambda i: (datasets.index(entries[i][0]), int(entries[i][2])))
    shown = [i for i, name in enumerate(columns) if wide or name not in ("dataset", "batch")
             or len({entries[row][i] for row in order}) > 1]
    title = table_title(settings, wide)
    if not wide and len(datasets) == 1:
        title = f"{datasets[0]}: {title}"
    table = Table(title=title, box=box.HEAVY_HEAD if wide else box.SIMPLE_HEAD, show_edge=wide, pad_edge=wide,
                  collapse_padding=not wide)
    for i in shown:
        folded = not wide and columns[i] == "quality"  # a long quality (or a skipped row's reason) wraps
        table.add_column(columns[i], justify="left" if columns[i] in ("dataset", "engine", "backend", "quality")
                         else "right", no_wrap=not wide and not folded, max_width=QUALITY_WIDTH if folded else None)
    for row in order:
        table.add_row(*(entries[row][i] for i in shown))
    return table


def print_table(rows: list[dict], skipped: list[dict], console: Console, settings: BenchmarkSettings) -> None:
    """The table, then a line for each dataset whose prompts were cut to fit the context."""
    console.print(build_table(rows, skipped, settings))
    for line in tree_lines(rows):
        console.print(line)
    for dataset, cut in {r["dataset"]: r["truncated_prompts"] for r in rows if r["truncated_prompts"]}.items():
        console.print(f"{dataset}: {cut} prompt(s) longer than the context minus --max-new-tokens kept their last "
                      "tokens")


def tree_lines(rows: list[dict]) -> list[str]:
    """Per dataset and batch size, spec_stream's tokens/s over static's (its one-token step,
    measured in the same run) and the trees its calls decoded with: a tree that does not pay
    shows here."""
    static = {(r["dataset"], r["batch_size"]): r for r in rows if r["engine"] == "static"}
    lines = []
    for r in rows:
        base = static.get((r["dataset"], r["batch_size"]))
        if r["engine"] == "spec_stream" and base:
            trees = ", ".join(f"{tree} {n / sum(r['trees_used'].values()):.0%}" for tree, n in
                              sorted(r["trees_used"].items(), key=lambda item: -item[1]))
            batch = f" at batch {r['batch_size']}" if r["batch_size"] > 1 else ""
            lines.append(f"{r['dataset']}{batch}: spec_stream {r['tokens_per_second'] / base['tokens_per_second']:.2f}x "
                         f"static (its one-token step, this run); trees of its calls: {trees}")
    return lines


@exit_on_user_error
def main(argv=None) -> int:
    settings = parse_settings(argv)
    check_output(settings.output, settings.overwrite)
    tasks = tasks_as_ready(settings)
    first = next(tasks)  # every existing checkpoint checked, or the first one prepared
    if "assisted" in settings.engines:
        check_draft_model(settings.draft_model)
    probe = measure_machine(settings.device)
    print(f"{settings.device} ({cpu_name()}, L3 {cpu_l3()}): copy {probe.copy_bytes_per_second / 1e9:.1f} GB/s "
          f"(read + write), read "
          f"{probe.read_bytes_per_second / 1e9:.1f} GB/s, fp32 matmul {probe.matmul_flops_per_second / 1e9:.0f} GFLOP/s")
    machine = {**machine_info(settings.device), "copy_gb_per_second": probe.copy_bytes_per_second / 1e9,
               "read_gb_per_second": probe.read_bytes_per_second / 1e9,
               "matmul_gflops_per_second": probe.matmul_flops_per_second / 1e9}
    console = Console()
    console = console if console.is_terminal else Console(width=WIDE_WIDTH if settings.wide_table else TERMINAL_WIDTH)
    rows, skipped = [], []
    for task_inputs in itertools.chain([first], tasks):
        task_rows, task_skipped = benchmark_task(task_inputs, settings, probe)
        rows += task_rows
        skipped += task_skipped
        print_table(task_rows, task_skipped, console, settings)  # this dataset's table, as soon as it is measured
        write_report({"schema_version": REPORT_SCHEMA_VERSION, "machine": machine, "settings": settings.to_json(),
                      "results": rows, "skipped": skipped}, settings.output)  # so far: nothing lost on a stop
    if len(settings.datasets) > 1:
        print_table(rows, skipped, console, settings)
    print(f"wrote {settings.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
