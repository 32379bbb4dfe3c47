"""Datasets, their prompts, and loading them from a local folder, a file or the hub.

Three presets: ``spider`` (text-to-SQL), ``dialogsum`` (dialogue summarisation) and
``e2e_nlg`` (restaurant data-to-text), with the prompt formats written below. Any other
dataset is a :class:`CustomDataset` (see "Your own data" below). Each :class:`Example` holds a ``prompt`` and a
``target``: the prompt never ends with a space and the target always starts with one, so a
BPE tokenizer sees the first target word as `` word``, as in running text. The target holds
no end-of-sequence token; :func:`tokenize_example` appends the tokenizer's eos.

Each task's prompt text is written once, in its builder (``_spider_examples``,
``_dialogsum_examples``, ``_e2e_examples``): an instruction (Spider: the database schema),
the row's input, then a cue line the target continues.

The Spider schema is one line per table from the official ``tables.json``, with the
original table and column names (``table_names_original``, ``column_names_original``),
without types or keys, to keep prompts short. The DialogSum dialogue is stripped (its turns stay on
separate lines); every other field has its whitespace collapsed to single spaces.

References (for the metrics): on every split but the fine-tuning one, E2E-NLG rows that
share a meaning representation become one example with all its human references (in
order of first appearance); DialogSum's test split has ``summary``, ``summary2`` and
``summary3``; Spider has its query. On the fine-tuning split every row is one example.

Local data: ``DIR/{spider,dialogsum,e2e_nlg}/{split}.jsonl`` plus ``DIR/spider/tables.json``,
read with plain :mod:`json`, where ``DIR`` is ``data_dir`` or ``$SPEC_STREAM_DATA_DIR``.
Without either, rows come from the Hugging Face hub through :mod:`datasets` (imported only
there), and Spider's schemas from the file named by ``$SPEC_STREAM_SPIDER_TABLES``
(without it: schema-free Spider prompts, with a warning).

Your own data (:func:`resolve_dataset`): ``--dataset`` names a local JSON-lines, JSON,
CSV or Parquet file, a folder of such files, or a hub dataset id, read with
``datasets.load_dataset``; ``--prompt-template`` is a :meth:`str.format` template over a
row's columns (``"Question: {question}\\nAnswer:"``), and the target is the column named by
``--response-field`` or the text of ``--response-template`` (in a template, ``\\n`` and ``\\t``
are a newline and a tab, as a shell passes them). The prompt loses its trailing
whitespace and the target is the response with its ends stripped and one space in front,
as in the presets; the response is the one reference. Splits: a source with several splits
(a hub dataset, a folder with ``train.jsonl`` and ``test.jsonl``, ...) keeps them and the
split flags name them; a source with one split (a single file) is split here by a seeded
hold-out: ``HOLDOUT_SHARE`` of the rows (at least one) become ``test``, as many others
``validation``, the rest ``train``, drawn by ``random.Random(HOLDOUT_SEED)`` (a fixed seed,
not ``--seed``) and kept in file order, so the same file always gives the same test rows
to fine-tuning and the benchmark. A CSV file's cells are read as the text they hold ("NA" and
"007" included).
"""
from __future__ import annotations

import csv
import functools
import itertools
import json
import os
import random
import re
import warnings
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from spec_stream import defaults
from spec_stream.errors import UserError
from spec_stream.hub import hub_address, hub_reachable, offline_mode

DATA_DIR_ENV = "SPEC_STREAM_DATA_DIR"
SPIDER_TABLES_ENV = "SPEC_STREAM_SPIDER_TABLES"
LAYOUT_HINT = (
    "a folder laid out like DIR/e2e_nlg/test.jsonl, DIR/dialogsum/test.jsonl, "
    "DIR/spider/validation.jsonl + DIR/spider/tables.json"
)

# A row and where it came from ("path line N" or "hub ID split S row N"), for error messages.
Row = tuple[str, Mapping[str, Any]]


@dataclass
class Example:
    """One prompt/target pair with every reference text the metrics should compare with."""

    prompt: str
    target: str
    references: list[str]
    id: str


@dataclass(frozen=True)
class Task:
    """A benchmark task: where its data lives and how rows become examples."""

    name: str
    hub_id: str
    folder: str
    columns: tuple[str, ...]
    train_split: str
    benchmark_split: str
    build: Callable[..., Iterator[Example]]


def _clean(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- builders


def _e2e_examples(rows: Iterable[Row], split: str, evaluation: bool, **_: Any) -> Iterator[Example]:
    """E2E-NLG: one example per row, or per distinct MR (first appearance order) when evaluating."""
    def prompt(mr: str) -> str:
        return f"Describe the restaurant: {mr}\nDescription:"

    if not evaluation:
        for index, (_, row) in enumerate(rows):
            reference = _clean(row["human_reference"])
            example_id = f"e2e_nlg/{split}/{index}"
            yield Example(prompt(_clean(row["meaning_representation"])), " " + reference, [reference], example_id)
        return
    groups: dict[str, list[str]] = {}
    for _, row in rows:
        groups.setdefault(_clean(row["meaning_representation"]), []).append(_clean(row["human_reference"]))
    for index, (mr, references) in enumerate(groups.items()):
        yield Example(prompt(mr), " " + references[0], references, f"e2e_nlg/{split}/{index}")


_HUB_DIALOGSUM_TEST_ID = re.compile(r"(test_\d+)_\d+")


def _dialogsum_examples(rows: Iterable[Row], split: str, evaluation: bool, **_: Any) -> Iterator[Example]:
    """DialogSum: one example per dialogue with ``summary`` (+ ``summary2``, ``summary3``).

    The hub's test split spreads each dialogue over three rows ``test_N_1`` .. ``test_N_3``
    with one summary each; those are merged back into one example with three references.
    """
    merged: dict[str, Example] = {}
    for _, row in rows:
        references = [
            _clean(row[key]) for key in ("summary", "summary2", "summary3")
            if isinstance(row.get(key), str) and row[key].strip()
        ]
        hub_test = _HUB_DIALOGSUM_TEST_ID.fullmatch(row["id"])
        if hub_test:
            key = hub_test.group(1)
            if key in merged:
                merged[key].references.extend(references)
                continue
        else:
            key = row["id"]
        prompt = f"Summarize the dialogue.\n{row['dialogue'].strip()}\nSummary:"
        example = Example(prompt, (" " + references[0]) if references else " ", references, key)
        if not hub_test:
            yield example
        else:
            merged[key] = example
    yield from merged.values()


def _spider_examples(
    rows: Iterable[Row], split: str, schemas: Mapping[str, str], tables_path: str, **_: Any
) -> Iterator[Example]:
    """Spider: schema of the row's database, then the question, then ``SQL:``; without
    ``schemas`` (the hub holds no tables.json), the question alone."""
    for index, (where, row) in enumerate(rows):
        schema = None if schemas is None else schemas.get(row["db_id"])
        if schemas is not None and schema is None:
            raise UserError(
                f"{where}: db_id {row['db_id']!r} is not in {tables_path}; "
                "use the official Spider tables.json that covers every database of this split"
            )
        query = _clean(row["query"])
        prompt = f"Question: {_clean(row['question'])}\nSQL:"
        yield Example(prompt if schema is None else f"Schema:\n{schema}\n{prompt}", " " + query, [query],
                      f"spider/{split}/{index}")


TASKS: dict[str, Task] = {
    "spider": Task(
        "spider", "xlangai/spider", "spider", ("db_id", "query", "question"), "train", "validation",
        _spider_examples,
    ),
    "dialogsum": Task(
        "dialogsum", "knkarthick/dialogsum", "dialogsum", ("id", "dialogue", "summary"), "train", "test",
        _dialogsum_examples,
    ),
    "e2e_nlg": Task(
        "e2e_nlg", "e2e_nlg", "e2e_nlg", ("meaning_representation", "human_reference"), "train", "test",
        _e2e_examples,
    ),
}


def task_names() -> list[str]:
    """Names of the known tasks, in registry order."""
    return list(TASKS)


def is_preset(name: str) -> bool:
    """Whether ``name`` is one of the three built-in tasks."""
    return str(name).strip().lower().replace("-", "_") in TASKS


def get_task(name: str) -> Task:
    """The :class:`Task` called ``name`` (case-insensitive, ``-`` accepted for ``_``)."""
    if not is_preset(name):
        raise UserError(f"unknown task {name!r}; use one of: {', '.join(TASKS)}, or your own data: a JSON-lines, "
                        "JSON, CSV or Parquet file or a hub dataset id, with --prompt-template TEMPLATE and "
                        "--response-field COLUMN (or --response-template TEMPLATE)")
    return TASKS[str(name).strip().lower().replace("-", "_")]


def resolve_tasks(name: str) -> list[str]:
    """``"all"`` -> every task name; a single valid name -> ``[name]``; otherwise UserError."""
    if str(name).strip().lower() == "all":
        return task_names()
    if str(name).strip().lower().replace("-", "_") not in TASKS:
        raise UserError(f"unknown task {name!r}; use one of: {', '.join(TASKS)}, or 'all' for every task")
    return [get_task(name).name]


# ------------------------------------------------------------------------------ sources


def _read_jsonl(path: Path) -> Iterator[Row]:
    """Rows of a JSON-lines file, skipping blank lines; bad UTF-8 or JSON is a UserError."""
    with open(path, "rb") as handle:  # bytes, so a decoding error can name its line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UserError(
                    f"{path} line {number}: byte 0x{raw[error.start]:02x} at column {error.start + 1} is not "
                    "UTF-8; save the file as UTF-8 or fix that line"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"{path} line {number}: not valid JSON ({error.msg}); fix or remove that line"
                raise UserError(message) from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {number}: expected a JSON object per line; fix or remove that line")
            yield f"{path} line {number}", row


def _checked(rows: Iterable[Row], task: Task) -> Iterator[Row]:
    """Pass rows through, raising a UserError for a missing or non-text required column."""
    for where, row in rows:
        for column in task.columns:
            if not isinstance(row.get(column), str):
                problem = "lacks column" if row.get(column) is None else "has a non-text value in column"
                raise UserError(
                    f"{where}: row {problem} {column!r}; "
                    f"every {task.name} row needs text columns {', '.join(task.columns)}"
                )
        yield where, row


def _split_file(task: Task, split: str, data_dir: Path) -> Path:
    """The JSON-lines file of ``split``, with UserErrors naming the expected layout."""
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; pass --data-dir DIR with {LAYOUT_HINT}")
    folder = data_dir / task.folder
    if not folder.is_dir():
        raise UserError(
            f"no folder {folder} for task {task.name}; "
            f"expected {folder}/{{train,{task.benchmark_split}}}.jsonl ({LAYOUT_HINT})"
        )
    available = sorted(path.stem for path in folder.glob("*.jsonl"))
    path = folder / f"{split}.jsonl"
    if not re.fullmatch(r"\w[\w-]*", split) or not path.is_file():
        raise UserError(
            f"no split {split!r} for task {task.name}: {path} not found; available splits in {folder}: "
            f"{', '.join(available) or 'none'} (expected {task.train_split} and {task.benchmark_split})"
        )
    return path


@functools.lru_cache(maxsize=1)
def _warn_schema_free() -> None:
    """Once per process: Spider from the hub without the schemas file."""
    warnings.warn(
        f"Spider from the hub comes without its database schemas (tables.json), so its prompts hold the "
        f"question alone and SQL validity is not scored; set {SPIDER_TABLES_ENV} to the official Spider "
        f"tables.json, or pass --data-dir DIR ({LAYOUT_HINT}), for schema prompts.", stacklevel=3)


def load_spider_schemas(tables_path: str | os.PathLike) -> dict[str, str]:
    """Map each ``db_id`` of a Spider ``tables.json`` to its one-line-per-table schema text."""
    path = Path(tables_path)
    if not path.is_file():
        raise UserError(f"Spider schema file {path} not found; put the official Spider tables.json there")
    try:
        databases = json.loads(path.read_text(encoding="utf-8"))
        schemas = {}
        for database in databases:
            columns: list[list[str]] = [[] for _ in database["table_names_original"]]
            for table_index, column in database["column_names_original"]:
                if table_index >= 0:
                    columns[table_index].append(column)
            lines = [f"{table}({', '.join(cols)})" for table, cols in zip(database["table_names_original"], columns)]
            schemas[database["db_id"]] = "\n".join(lines)
    except (ValueError, KeyError, TypeError, IndexError) as error:
        raise UserError(
            f"{path} is not a Spider tables.json ({type(error).__name__}: {error}); use the official Spider tables.json"
        ) from None
    return schemas


def _hub_rows(task: Task, split: str) -> Iterator[Row]:
    """Rows of the hub dataset; any failure (no network, no `datasets`) is a UserError."""
    hint = f"pass --data-dir DIR ({LAYOUT_HINT}) or set {DATA_DIR_ENV}"
    try:
        import datasets  # noqa: PLC0415  (optional: the GPU machine lacks it)
    except ImportError:
        raise UserError(
            f"cannot load {task.hub_id!r} from the Hugging Face hub: the `datasets` package is not installed; {hint}"
        ) from None
    if not offline_mode() and not hub_reachable():
        raise UserError(f"cannot load {task.hub_id!r} from the Hugging Face hub: {hub_address()[0]} is not reachable "
                        f"(offline?); {hint} (or set HF_HUB_OFFLINE=1 to use the hub's local cache)")
    try:
        dataset = datasets.load_dataset(task.hub_id, split=split)
    except Exception as error:  # noqa: BLE001  (network, offline mode, unknown split, ...)
        reason = (str(error).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"could not load {task.hub_id!r} split {split!r} from the Hugging Face hub "
            f"({type(error).__name__}: {reason}); {hint}"
        ) from None
    return ((f"hub {task.hub_id} split {split} row {index}", row) for index, row in enumerate(dataset))


def load_examples(
    task: str | CustomDataset,
    split: str,
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
) -> list[Example]:
    """Load the examples of ``task``'s ``split`` (at most ``limit`` of them).

    ``task`` is a preset's name or a :class:`CustomDataset` (which ignores ``data_dir``).
    For a preset, ``data_dir`` (or ``$SPEC_STREAM_DATA_DIR``) is a local folder laid out like
    ``shared/datasets``; without one, rows come from the hub. ``limit`` counts examples,
    so on grouped E2E-NLG splits it counts distinct meaning representations.
    Every bad input (unknown task or split, missing file or column, unknown Spider
    database, unreachable hub) raises :class:`UserError`.
    """
    spec = task if isinstance(task, CustomDataset) else get_task(task)
    if limit is not None and limit < 0:
        raise UserError(f"limit must be a number of examples >= 0 (or None for all), got {limit}")
    if isinstance(spec, CustomDataset):
        return _custom_examples(spec, split, limit)
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    extra: dict[str, Any] = {}
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        path = _split_file(spec, split, root)
        rows: Iterable[Row] = _read_jsonl(path)
        if spec.name == "spider":
            tables = root / spec.folder / "tables.json"
            extra = {"schemas": load_spider_schemas(tables), "tables_path": str(tables)}
    else:
        if spec.name == "spider":
            tables_env = os.environ.get(SPIDER_TABLES_ENV)
            if tables_env:
                extra = {"schemas": load_spider_schemas(tables_env), "tables_path": tables_env}
            else:
                _warn_schema_free()
                extra = {"schemas": None, "tables_path": None}
        rows = _hub_rows(spec, split)
    examples = spec.build(_checked(rows, spec), split=split, evaluation=split != spec.train_split, **extra)
    return list(itertools.islice(examples, limit))


# ------------------------------------------------------------------------ your own data

DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # datasets' builders
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass(frozen=True)
class CustomDataset:
    """A dataset of the user's (see the module docstring): ``source`` is a data file, a
    folder of them or a hub id; the templates make each row's prompt and target."""

    source: str
    prompt_template: str
    response_field: str | None = None
    response_template: str | None = None

    @property
    def name(self) -> str:
        """A short name for logs and reports: the file's stem, the folder's or the hub dataset's name."""
        path = Path(self.source)
        return path.stem if path.suffix.lower() in DATA_FILE_TYPES else path.name or self.source


@dataclass
class _Split:
    """One split of a custom dataset; ``numbers``: each row's 1-based row in the source
    file when the split was held out of it (None: the source's own split)."""

    rows: Any
    numbers: list[int] | None = None


def resolve_dataset(dataset: str, prompt_template: str | None = None, response_field: str | None = None,
                    response_template: str | None = None) -> str | CustomDataset:
    """``--dataset`` with the template flags: a preset's name, or the :class:`CustomDataset`
    they describe. Every flag is checked (UserError) before any data is read."""
    if is_preset(dataset):
        if (prompt_template, response_field, response_template) != (None, None, None):
            raise UserError(f"--dataset {dataset} is a preset with its own prompt format; --prompt-template, "
                            "--response-field and --response-template apply to your own data (a file or hub id)")
        return get_task(dataset).name
    path = Path(dataset).expanduser()
    if prompt_template is None and (path.exists() or path.suffix.lower() in DATA_FILE_TYPES):
        raise UserError(f"--dataset {dataset} is your own data: say how a row becomes a prompt with "
                        "--prompt-template (e.g. 'Question: {question}\\nAnswer:') and its target with "
                        "--response-field COLUMN or --response-template TEMPLATE")
    if prompt_template is None:
        get_task(dataset)  # the unknown-task error, which lists everything --dataset takes
    if (response_field is None) == (response_template is None):
        raise UserError("give the target of each row with exactly one of --response-field COLUMN or "
                        "--response-template TEMPLATE")
    if path.is_file() and path.suffix.lower() not in DATA_FILE_TYPES:
        raise UserError(f"--dataset {dataset}: unknown file type {path.suffix or '(none)'!r}; "
                        "use a .jsonl, .json, .csv or .parquet file")
    if not path.exists() and (path.suffix.lower() in DATA_FILE_TYPES or not HUB_ID.fullmatch(dataset)):
        raise UserError(f"--dataset {dataset}: no such file; check the path, or name a hub dataset id (owner/name)")
    prompt_template, response_template = (_with_escapes(t) for t in (prompt_template, response_template))
    template_columns(prompt_template, "--prompt-template")
    if response_template is not None:
        template_columns(response_template, "--response-template")
    return CustomDataset(dataset, prompt_template, response_field, response_template)


def _with_escapes(template: str | None) -> str | None:
    """``\\n`` and ``\\t`` typed in a template (a shell passes them as two characters) as a
    newline and a tab."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def dataset_name(dataset: str | CustomDataset) -> str:
    """The name logs, reports and checkpoint folders use for a preset or a custom dataset."""
    return dataset.name if isinstance(dataset, CustomDataset) else get_task(dataset).name


def default_split(dataset: str | CustomDataset, role: str) -> str:
    """The split a preset or a custom dataset uses for ``role``: "train", "eval" or "test"
    (the benchmark's). Custom datasets: ``train``, ``validation`` and ``test``."""
    if isinstance(dataset, CustomDataset):
        return {"train": "train", "eval": "validation", "test": "test"}[role]
    task = get_task(dataset)
    return {"train": task.train_split, "eval": "validation", "test": task.benchmark_split}[role]


def template_columns(template: str, flag: str) -> list[str]:
    """The columns a :meth:`str.format` template reads (``{a}``, ``{a[0]}``, ``{a.b}`` read ``a``)."""
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:
        raise UserError(f"{flag} {template!r}: {error}; write a column as {{column}} and a literal brace "
                        "as {{ or }}") from None
    columns = [re.match(r"[^.\[]*", field).group(0) for field in fields]
    if not columns or not all(column and not column.isdigit() for column in columns):
        raise UserError(f"{flag} {template!r} must name the columns it uses, e.g. {{question}}")
    return columns


def _read_source(spec: CustomDataset):
    """``datasets.load_dataset`` of the file, folder or hub id: a DatasetDict; every failure a UserError."""
    try:
        import datasets  # noqa: PLC0415  (optional: the GPU machine lacks it)
    except ImportError:
        raise UserError("reading your own data needs the `datasets` package: pip install datasets") from None
    path = Path(spec.source).expanduser()
    kind = DATA_FILE_TYPES.get(path.suffix.lower()) if path.is_file() else None
    try:
        if kind == "csv":  # every cell as the text it is ("NA" and "007" included)
            with open(path, newline="", encoding="utf-8") as handle:
                header = next(csv.reader(handle), [])
            text = datasets.Features({column: datasets.Value("string") for column in header})
            return datasets.load_dataset(kind, data_files=str(path), features=text, keep_default_na=False,
                                         na_filter=False)
        if kind:
            return datasets.load_dataset(kind, data_files=str(path))
        return datasets.load_dataset(str(path) if path.exists() else spec.source)
    except Exception as error:  # noqa: BLE001  (parse errors, encodings, network, unknown id, ...)
        cause = error.__cause__ or error  # datasets wraps the reader's error
        reason = f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
        if path.exists():
            raise UserError(f"cannot read {path} ({reason}); fix the file, or save it as UTF-8 JSON lines, "
                            "CSV or Parquet") from None
        raise UserError(f"could not load {spec.source!r} from the Hugging Face hub ({reason}); check the id and "
                        "the connection, or pass a local file: --dataset FILE.jsonl") from None


def _custom_splits(spec: CustomDataset) -> dict[str, _Split]:
    """The splits of ``spec``: the source's own, or train/validation/test held out of its only one."""
    loaded = _read_source(spec)
    if len(loaded) > 1:
        return {name: _Split(rows) for name, rows in loaded.items()}
    (rows,) = loaded.values()
    held = max(1, round(defaults.HOLDOUT_SHARE * len(rows)))
    if len(rows) < 2 * held + 1:
        raise UserError(f"{spec.source} has {len(rows)} rows in its only split; it needs at least 3, since "
                        "validation and test rows are held out of it: add rows")
    order = random.Random(defaults.HOLDOUT_SEED).sample(range(len(rows)), len(rows))
    parts = {"train": order[2 * held:], "validation": order[held:2 * held], "test": order[:held]}
    return {name: _Split(rows.select(sorted(part)), [i + 1 for i in sorted(part)]) for name, part in parts.items()}


def _used_columns(spec: CustomDataset, columns: list[str]) -> set[str]:
    """The columns the templates and --response-field read; a UserError naming the flag, the
    missing column and the columns that exist when one is not in ``columns``."""
    wanted = [("--prompt-template", c) for c in template_columns(spec.prompt_template, "--prompt-template")]
    if spec.response_field is not None:
        wanted.append(("--response-field", spec.response_field))
    else:
        wanted += [("--response-template", c) for c in template_columns(spec.response_template, "--response-template")]
    for flag, column in wanted:
        if column not in columns:
            raise UserError(f"{flag} names column {column!r}, which {spec.source} lacks; "
                            f"its columns are: {', '.join(columns)}")
    return {column for _, column in wanted}


def _custom_example(spec: CustomDataset, split: str, index: int, row: Mapping[str, Any], used: set[str],
                    where: str) -> Example:
    """One row as an :class:`Example`; a missing value or a template that fails on it is a UserError."""
    for column in sorted(used):
        if row[column] is None:
            raise UserError(f"{where} has no value in column {column!r}; fill it in or remove the row")

    def fill(template: str, flag: str) -> str:
        try:
            return template.format_map(row)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError) as error:
            raise UserError(f"{where}: {flag} {template!r} fails on this row ({type(error).__name__}: {error}); "
                            "fix the template or the row") from None

    prompt = fill(spec.prompt_template, "--prompt-template").rstrip()
    if not prompt:
        columns = ", ".join(template_columns(spec.prompt_template, "--prompt-template"))
        raise UserError(f"{where}: --prompt-template {spec.prompt_template!r} gives an empty prompt on this row (a "
                        f"model needs a prompt to continue); fill in its column {columns}, remove the row, or add "
                        "fixed text to the template")
    response = str(row[spec.response_field]) if spec.response_field else fill(spec.response_template,
                                                                              "--response-template")
    response = response.strip()
    return Example(prompt, " " + response, [response], f"{spec.name}/{split}/{index}")


def _custom_examples(spec: CustomDataset, split: str, limit: int | None) -> list[Example]:
    splits = _custom_splits(spec)
    if split not in splits:
        raise UserError(f"{spec.source} has no split {split!r}; its splits are: {', '.join(splits)} "
                        "(choose with --train-split, --eval-split or --test-split)")
    part = splits[split]
    used = _used_columns(spec, part.rows.column_names)
    count = len(part.rows) if limit is None else min(limit, len(part.rows))
    examples = []
    for index, row in enumerate(part.rows.select(range(count))):
        where = f"{spec.source} row {part.numbers[index]}" if part.numbers else f"{spec.source} {split} row {index}"
        examples.append(_custom_example(spec, split, index, row, used, where))
    return examples


# ----------------------------------------------------------------------------- training


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, for any HF-style tokenizer."""
    if not text:
        return []
    if callable(tokenizer):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_example(tokenizer: Any, example: Example, max_length: int) -> dict[str, list[int]]:
    """Causal-LM features: ``input_ids`` = prompt + target + eos, ``labels`` -100 over the prompt.

    Prompt and target are tokenized separately, so the boundary is exact. When the whole
    does not fit in ``max_length`` tokens, the prompt loses tokens from its start (its end,
    next to the target, is kept). When even target + eos does not fit, only the prompt's
    last token is kept (the first target token is still predicted from context) and the
    target's end is cut, eos included: the text does not end there.
    """
    if max_length < 1:
        raise UserError(f"max_length must be >= 1, got {max_length}; pass a positive --max-length")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError("the tokenizer has no eos token; set tokenizer.eos_token (GPT-Neo uses '<|endoftext|>')")
    prompt_ids = _encode(tokenizer, example.prompt)
    target_ids = _encode(tokenizer, example.target) + [eos]
    if len(prompt_ids) + len(target_ids) > max_length:
        if len(target_ids) < max_length:
            prompt_ids = prompt_ids[len(prompt_ids) + len(target_ids) - max_length:]
        else:
            keep = 1 if prompt_ids and max_length > 1 else 0
            prompt_ids = prompt_ids[len(prompt_ids) - keep:]
            target_ids = target_ids[: max_length - keep]
    return {"input_ids": prompt_ids + target_ids, "labels": [-100] * len(prompt_ids) + target_ids}
