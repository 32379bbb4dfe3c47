"""Sampling runs: whether each engine's samples come from naive's distribution, by a paired
z-test over the prompts of the mean log-probability per token under the reference model
(see "Sampling" in the `spec_stream.benchmark` package docstring)."""
from __future__ import annotations

import math

import numpy as np
import torch

from spec_stream.benchmark.inputs import Prompt, TaskInputs
from spec_stream.benchmark.settings import BenchmarkSettings
from spec_stream.defaults import SAMPLING_CHECK_LEVEL
from spec_stream.engines import load_upstream


def check_distributions(rows: list[dict], outputs: list[list[list[int]]], naive_outputs: list[list[int]],
                        inputs: TaskInputs, settings: BenchmarkSettings) -> None:
    """Fill each row's ``distribution_check`` against naive's batch-1 samples, scored by
    the reference model (fp32, upstream, as naive ran it) with the run's warpers."""
    model = load_upstream(inputs.reference, "eager").to(settings.device).eval()
    warpers = settings.sampling.warpers()
    reference_means, _ = mean_log_probs(model, inputs.prompts, naive_outputs, warpers)
    for row, tokens in zip(rows, outputs):
        means, outside = mean_log_probs(model, inputs.prompts, tokens, warpers)
        row["distribution_check"] = paired_z_test(means, reference_means, outside, SAMPLING_CHECK_LEVEL)


@torch.no_grad()
def mean_log_probs(model, prompts: list[Prompt], outputs: list[list[int]], warpers) -> tuple[list[float], int]:
    """Per prompt, the mean over its new tokens of log p(token | text before it) under
    ``model`` with ``warpers`` applied to its logits (what sampling draws from), and the
    number of tokens to which that gives probability 0 (left out of the means)."""
    means, outside = [], 0
    for prompt, tokens in zip(prompts, outputs):
        ids = torch.cat([prompt.ids, torch.tensor([tokens])], dim=1).to(model.device)
        logits = model(ids).logits[0, prompt.ids.shape[1] - 1:-1].float()
        scores = warpers(ids[:, :1].expand(len(tokens), 1), logits)  # the warpers read only the scores
        log_probs = scores.log_softmax(dim=-1).gather(1, ids[0, prompt.ids.shape[1]:, None])[:, 0]
        finite = torch.isfinite(log_probs)
        outside += int((~finite).sum())
        means.append(float(log_probs[finite].mean()) if bool(finite.any()) else -math.inf)
    return means, outside


def paired_z_test(means: list[float], reference_means: list[float], outside: int, level: float) -> dict | None:
    """The distribution check of one row (see "Sampling" in `spec_stream.benchmark`):
    differences of the per-prompt means against the reference's, z = mean / (sd / sqrt(n)),
    two-sided p by the normal approximation; None with fewer than 2 prompts."""
    differences = [a - b for a, b in zip(means, reference_means) if math.isfinite(a - b)]
    if len(differences) < 2:
        return None
    spread = max(float(np.std(differences, ddof=1)), 1e-12)
    statistic = float(np.mean(differences)) / (spread / math.sqrt(len(differences)))
    p_value = math.erfc(abs(statistic) / math.sqrt(2))
    return {"test": "paired z-test over prompts of the mean log-probability per token under the reference model",
            "mean_log_prob": float(np.mean([m for m in means if math.isfinite(m)])),
            "reference_mean_log_prob": float(np.mean(reference_means)), "statistic": statistic, "p_value": p_value,
            "level": level, "tokens_outside_support": outside, "passed": outside == 0 and p_value >= level}
