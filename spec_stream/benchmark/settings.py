"""What a benchmark run measures (`BenchmarkSettings`, checked by `dataset_tps.py`'s
parser) and the version of the report's layout."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from huggingface.transformers.generation.speculative_tree import TreeSpec
from spec_stream.data import CustomDataset
from spec_stream.defaults import LOOKUP_BRANCH
from spec_stream.engines import Sampling


REPORT_SCHEMA_VERSION = 4  # the report's layout, documented field by field in docs/report.md


@dataclass(frozen=True)
class BenchmarkSettings:
    """What a benchmark run measures, checked by `dataset_tps.py`'s parser."""

    engines: tuple[str, ...]  # `naive` first: the fp32 reference
    datasets: tuple[str | CustomDataset, ...]  # presets' names, or one dataset of the user's
    device: torch.device
    num_samples: int
    max_new_tokens: int
    repeats: int
    tree_widths: TreeSpec | str  # "auto": each checkpoint's own best tree for the device
    half_dtype: torch.dtype
    output: Path
    overwrite: bool = False  # --overwrite: an existing output file may be replaced
    model: str | None = None  # one checkpoint for every dataset; None: the default ones
    checkpoint_dir: Path = Path("checkpoints")
    data_dir: str | None = None
    split: str | None = None  # None: each task's benchmark split
    draft_model: str | None = None
    cuda_graphs: bool = True
    reference_model: str | None = None  # what naive runs; None: the checkpoint itself
    batch_sizes: tuple[int, ...] = (1,)  # ascending; every engine runs at each
    do_sample: bool = False
    temperature: float | None = None  # the sampling settings: None when greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    lookup_branch: int | None = None  # spec_stream's prompt-lookup nodes; None: the task's (LOOKUP_BRANCH)
    wide_table: bool = False  # print every column (the default table fits 120 columns)

    def lookup_branch_for(self, task: str) -> int:
        """``lookup_branch`` as given, else the preset's default (your own data: "custom")."""
        if self.lookup_branch is not None:
            return self.lookup_branch
        return LOOKUP_BRANCH.get(task, LOOKUP_BRANCH["custom"])

    @property
    def sampling(self) -> Sampling | None:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed) if self.do_sample else None

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["datasets"] = [d if isinstance(d, str) else asdict(d) for d in self.datasets]
        values["tree_widths"] = str(self.tree_widths)  # "auto" or "4,3,2", as given on the command line
        return {k: str(v) if isinstance(v, (torch.device, torch.dtype, Path)) else v for k, v in values.items()}
