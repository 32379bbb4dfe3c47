"""Exactness: each row's outputs against greedy decoding of the engine's own model and
against naive's, and, before any timing, our plain greedy decoding against upstream
GPT-Neo's (the references every comparison relies on)."""
from __future__ import annotations

import torch
import transformers

from huggingface.transformers.internals import SUPPORTED, private
from spec_stream import GPTNeoForCausalLM
from spec_stream.benchmark.inputs import Prompt, TaskInputs
from spec_stream.benchmark.settings import BenchmarkSettings
from spec_stream.checkpoints import load_for_inference
from spec_stream.defaults import REFERENCE_CHECK_PROMPTS
from spec_stream.engines import Engine, load_upstream, plain_decoding
from spec_stream.errors import UserError


def exactness(engine: Engine, outputs: list[list[int]], naive_outputs: list[list[int]], inputs: TaskInputs,
              settings: BenchmarkSettings, known: dict) -> dict:
    """A row's comparisons with batch-1 decoding: its own model's greedy decoding (null
    when sampling: `distribution_check` replaces it) and naive's output (with sampling:
    naive's samples for the same seeds)."""
    if settings.do_sample:
        greedy, described = None, "none: sampling (see distribution_check)"
    else:
        reference = greedy_reference(engine, inputs.prompts, settings.max_new_tokens, inputs.tokenizer.eos_token_id,
                                     known)
        greedy = share_identical(outputs, reference)
        _, owner, attention, weights = model_key(engine)
        described = f"greedy generate of the {owner} model ({attention}, {weights})"
    return {"greedy_reference": described, "identical_to_greedy": greedy,
            "identical_to_naive": share_identical(outputs, naive_outputs), "distribution_check": None}


def share_identical(outputs: list[list[int]], reference: list[list[int]]) -> float:
    return sum(a == b for a, b in zip(outputs, reference)) / len(outputs)


def greedy_reference(engine: Engine, prompts: list[Prompt], max_new_tokens: int, eos_token_id: int | None,
                     known: dict) -> list[list[int]]:
    """Greedy decoding of the engine's own model in its own weight format: what an exact
    engine must reproduce. Computed once per `model_key` and kept in ``known`` (which
    `naive`'s batch-1 outputs seed: they are upstream greedy of the fp32 model)."""
    key = model_key(engine)
    if key not in known:
        known[key] = greedy_outputs(engine.model, prompts, max_new_tokens, eos_token_id)
    return known[key]


def model_key(engine: Engine) -> tuple[str, str, str, str]:
    """What decides an engine's greedy output: checkpoint, model code, attention and weight format."""
    model = engine.model
    owner = "spec-stream" if isinstance(model, GPTNeoForCausalLM) else "upstream"
    return engine.checkpoint, owner, private(model.config, "_attn_implementation"), engine.weight_format


@torch.no_grad()
def greedy_outputs(model, prompts: list[Prompt], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    """Upstream greedy `generate` of ``model`` as it is (weights, attention, dtype), untimed."""
    outputs = []
    for prompt in prompts:
        ids = prompt.ids.to(model.device)
        sequences = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
                                   **plain_decoding(model))
        outputs.append(sequences[0, ids.shape[1]:].tolist())
    return outputs


def check_plain_decoding(inputs: TaskInputs, settings: BenchmarkSettings) -> None:
    """A UserError (exit 2) unless our model's plain greedy `generate` of the checkpoint
    equals upstream GPT-Neo's greedy `generate` of the same weights (same attention) on the
    first `REFERENCE_CHECK_PROMPTS` prompts, both with eager attention (upstream GPT-Neo has
    no other on a CPU). Every exactness figure compares with these
    references: if the installed transformers hands our model what it does not read, the
    run stops here rather than report that exact engines are lossy (or that broken ones
    are exact)."""
    ours, _ = load_for_inference(inputs.checkpoint)
    ours.set_attn_implementation("eager")
    ours = ours.to(settings.device).eval()
    upstream = load_upstream(inputs.checkpoint, "eager")
    prompts, eos = inputs.prompts[:REFERENCE_CHECK_PROMPTS], inputs.tokenizer.eos_token_id
    ours_out = greedy_outputs(ours, prompts, settings.max_new_tokens, eos)
    upstream_out = greedy_outputs(upstream.to(settings.device).eval(), prompts, settings.max_new_tokens, eos)
    for index, (a, b) in enumerate(zip(ours_out, upstream_out)):
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise UserError(
                f"{inputs.task}: spec-stream's plain greedy decoding of {inputs.checkpoint} differs from upstream "
                f"GPT-Neo's on prompt {index} from new token {at} on, with transformers {transformers.__version__} "
                f"and torch {torch.__version__}: the references this benchmark compares with are broken, so it stops "
                f"before timing. spec-stream is tested with {SUPPORTED}: pip install -r requirements.txt."
            )


def naive_batch1_outputs(engine: Engine, inputs: TaskInputs, settings: BenchmarkSettings) -> list[list[int]]:
    """naive's outputs at batch 1 (untimed): the reference when the sweep skips batch 1."""
    results = engine.run_many([p.ids for p in inputs.prompts], settings.max_new_tokens, inputs.tokenizer.eos_token_id)
    return [r.new_tokens for r in results]
