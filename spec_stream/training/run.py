"""A fine-tuning run in progress (`Run`): the model with what trains selected, its
tokenizer, optimizer, schedule and training features, restored from the checkpoint when
resuming; and the device peak that MFU is measured against."""
from __future__ import annotations

import dataclasses
import functools
import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from spec_stream import GPTNeoForCausalLM, defaults
from spec_stream.arithmetic import ModelShape, measure_machine
from spec_stream.checkpoints import build_from_scratch, load_base
from spec_stream.data import dataset_name, tokenize_example
from spec_stream.training.config import FinetuneConfig, adapter_rank_of, dataset_of
from spec_stream.training.inputs import Inputs


@dataclass
class Run:
    """A fine-tuning run in progress: what the training loop, the checkpoints and the
    final evaluation share."""

    config: FinetuneConfig
    inputs: Inputs
    accelerator: Accelerator
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    features: list[dict]
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    first_loss: float | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    saved_step: int | None = None
    tokens: int = 0  # non-padding tokens trained on (all processes)
    flops: float = 0.0  # matmul FLOPs of those steps (`batch_flops`)
    peak_flops: float = 1.0  # the device's: a measured fp32 matmul rate on a CPU, --peak-tflops on a GPU
    shape: ModelShape | None = None

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes


def select_trainable(model, config: FinetuneConfig):
    """What trains: everything, the streams only (--freeze-base) or LoRA and the streams."""
    if config.freeze_base:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "transformer.streams." in name
        return model
    if config.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank,
                                                 target_modules=list(defaults.LORA_TARGETS), lora_dropout=0.0))
        for name, parameter in model.named_parameters():
            if "transformer.streams." in name:
                parameter.requires_grad = True
    return model


def build_run(config: FinetuneConfig, inputs: Inputs, accelerator: Accelerator) -> Run:
    """Model, tokenizer, optimizer and schedule, restored from the checkpoint with --resume."""
    task = dataset_name(dataset_of(config))
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    state = inputs.resume.state if inputs.resume else None
    if state:  # shapes and tokenizer were saved with the checkpoint, weights in its state file
        model, tokenizer = GPTNeoForCausalLM(inputs.resume.model_config), inputs.resume.tokenizer
    elif config.from_scratch:
        model, tokenizer = build_from_scratch(config.from_scratch, [e.prompt + e.target for e in inputs.train],
                                              config.num_spec_streams, config.num_stream_layers, task)
    else:
        model, tokenizer = load_base(config.base, config.num_spec_streams, config.num_stream_layers, task)
    adapter_rank = adapter_rank_of(config)
    if not state and adapter_rank and model.config.stream_adapter_rank != adapter_rank:
        model.add_stream_adapters(adapter_rank)
    model.config.main_loss_weight, model.config.stream_loss_weight = config.main_loss_weight, config.stream_loss_weight
    model = select_trainable(model, config)
    if state:
        model.load_state_dict(state["model"])
    features = [tokenize_example(tokenizer, e, config.max_length) for e in inputs.train]
    if config.stream_targets == "greedy":
        features = greedy_features(model, tokenizer, features, accelerator.device)
    steps_per_epoch = math.ceil(len(features) / (config.batch_size * accelerator.num_processes))  # global batches
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    run = Run(config, inputs, accelerator, model, tokenizer, optimizer, scheduler, features, steps_per_epoch,
              total_steps, peak_flops=peak_flops(accelerator.device, config),
              shape=ModelShape.of(accelerator.unwrap_model(model).config))
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        run.step, run.first_loss, run.losses = state["step"], state["first_loss"], list(state["losses"])
        run.saved_step = run.step
        accelerator.print(f"resuming from {inputs.resume.folder} at step {run.step}/{total_steps}")
    return run


@torch.no_grad()
def greedy_features(model, tokenizer, features: list[dict], device) -> list[dict]:
    """``features`` with each target replaced by the model's own greedy continuation of its
    prompt, as long as the reference target at most (up to its end-of-sequence token, kept
    as a target): what the streams will see when decoding. Deterministic, so a resumed run
    makes the same texts again."""
    model.eval()
    model.to(device)
    eos, pad, batch = tokenizer.eos_token_id, tokenizer.pad_token_id, defaults.GREEDY_TARGETS_BATCH
    rebuilt = []
    for start in tqdm(range(0, len(features), batch), desc="greedy targets", unit="batch"):
        chunk = features[start:start + batch]
        prompts = [[t for t, label in zip(f["input_ids"], f["labels"]) if label == -100] for f in chunk]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        longest = max(len(f["labels"]) - len(p) for f, p in zip(chunk, prompts))
        out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, speculative_streaming=True,
                             tree_widths=(), pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for f, prompt, new in zip(chunk, prompts, out):
            target = new[: len(f["labels"]) - len(prompt)]
            target = target[: target.index(eos) + 1] if eos in target else target
            rebuilt.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    model.train()
    return rebuilt


def peak_flops(device: torch.device, config: FinetuneConfig) -> float:
    """The denominator of MFU: on a GPU the datasheet peak (--peak-tflops); on a CPU the
    fp32 matmul rate measured now (a short probe: no datasheet knows a shared machine)."""
    if device.type == "cuda":
        return config.peak_tflops * 1e12
    return cpu_matmul_rate()


@functools.lru_cache(maxsize=1)
def cpu_matmul_rate() -> float:
    """fp32 matmul FLOP/s of this process's threads, measured once (about half a second),
    leaving the random state as it was (a resumed run must draw what the first one drew)."""
    with torch.random.fork_rng(devices=[]):
        return measure_machine("cpu", repeats=3, buffer_bytes=2**22).matmul_flops_per_second
