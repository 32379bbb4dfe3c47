"""Fine-tune the speculative streams (docs/method.md) with `accelerate`.

    python -m spec_stream.finetune --dataset e2e_nlg --output runs/e2e --from-scratch tiny --data-dir DIR
    python -m spec_stream.finetune --dataset mine.jsonl --prompt-template 'Q: {question}\\nA:' \\
        --response-field answer --output runs/mine
    accelerate launch -m spec_stream.finetune --dataset spider --output runs/sql --base EleutherAI/gpt-neo-125m
    accelerate launch --multi_gpu --num_processes 2 -m spec_stream.finetune ...  # 2 processes on a CPU (gloo)

`--dataset` is a preset or your own data (a file or hub id with templates: see
`spec_stream.data`). Processes share each global batch (``--batch-size`` rows each) and
weight their losses by their share of its target tokens, so N processes follow the same
loss curve as one process with N times the batch; only the main process writes. Without a
GPU, `accelerate launch` needs ``--multi_gpu`` to start several processes (they then run on
the CPU); a launch that started one process where several were asked is refused.

Loss ``a0 * CE(main) + a_j * sum_j CE(stream_j)`` on target tokens only. Modes: full
fine-tuning (default), LoRA (`--lora-rank R`, merged before the final save) and
`--freeze-base` (only `transformer.streams.*` trains: the main stream stays the base model
bit for bit). A checkpoint (`OUTPUT/checkpoint-<step>`) is published every `--save-every` steps,
at the end of each epoch and on SIGTERM or Ctrl-C (exit 143 / 130); `--resume` continues
from the newest one exactly (same batch order, optimizer and scheduler state), whatever
moment the previous run was killed at. The final model, tokenizer and `training_args.json`
go to OUTPUT beside anything else there (a folder holding other files, or an earlier run
without `--resume`, needs `--overwrite`), loadable by `from_pretrained` and `dataset_tps.py`.

From Python: ``finetune(FinetuneConfig(dataset="e2e_nlg", output="runs/e2e"))``, with
`FinetuneConfig` from `spec_stream.training.config`. This module is the command line and
the run's outline; each part of a run lives in `spec_stream.training` (settings, inputs,
model and optimizer, batches, the training loop, the evaluation and final save).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch
from accelerate import Accelerator

from spec_stream import defaults
from spec_stream.checkpoints import MODEL_SIZES, remove_stale_temporaries
from spec_stream.cli_help import PlainDefaultsHelpFormatter
from spec_stream.errors import UserError, exit_on_user_error
from spec_stream.training.config import PRECISIONS, STREAM_TARGETS, FinetuneConfig, check_config
from spec_stream.training.evaluation import final_evaluation, save_final
from spec_stream.training.inputs import load_inputs, prepare_output
from spec_stream.training.loop import StopSignals, train
from spec_stream.training.run import build_run

# ---------------------------------------------------------------------- the command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of :class:`FinetuneConfig`: one flag per field, defaults taken from it."""
    parser = argparse.ArgumentParser(prog="python -m spec_stream.finetune", description=__doc__.split("\n\n")[0],
                                     formatter_class=PlainDefaultsHelpFormatter)
    add = _flag_adder(parser)
    for add_flags in (_add_data_flags, _add_schedule_flags, _add_stream_flags, _add_run_flags):
        add_flags(add)
    return parser


def _flag_adder(parser: argparse.ArgumentParser):
    """``add(name, help, **kwargs)``: the flag of the FinetuneConfig field ``name``, its
    default (or required, or a switch) taken from the field."""
    fields = {field.name: field.default for field in dataclasses.fields(FinetuneConfig)}

    def add(name: str, help: str, **kwargs):
        default = fields[name]
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        parser.add_argument("--" + name.replace("_", "-"), help=help, **kwargs)

    return add


def _add_data_flags(add) -> None:
    """The data and the output folder."""
    add("dataset", "a preset (spider, dialogsum, e2e_nlg), or your own data: a .jsonl, .json, .csv or .parquet "
        "file, a folder of them, or a hub dataset id (with --prompt-template and --response-field)",
        metavar="PRESET_FILE_OR_HUB_ID")
    add("output", "folder for the final model and its checkpoint-<step>/ (other files in it are kept)")
    add("data_dir", "local JSON-lines copies of the presets (default: $SPEC_STREAM_DATA_DIR, then the hub)")
    add("prompt_template", "your own data: a row's prompt, str.format over its columns, e.g. "
        "'Question: {question}\\nAnswer:' (default: none; presets have their own)", metavar="TEMPLATE")
    add("response_field", "your own data: the column holding the target text (default: none)", metavar="COLUMN")
    add("response_template", "your own data: the target as a template instead, e.g. '{answer} ({unit})' "
        "(default: none)", metavar="TEMPLATE")


def _add_schedule_flags(add) -> None:
    """The starting model, the splits and the training schedule."""
    add("from_scratch", f"train a new model of this size: {', '.join(MODEL_SIZES)} "
        f"(default: {defaults.FROM_SCRATCH_SIZE} unless --base is given)", metavar="SIZE")
    add("base", "a GPT-Neo checkpoint (folder or hub id) to fine-tune (default: none, a model from scratch)",
        metavar="PATH_OR_HUB_ID")
    add("train_split", "split to train on (default: train; a single file is split 80/10/10 into train, "
        "validation and test by a fixed-seed hold-out)")
    add("eval_split", "split for the final validation pass")
    add("epochs", "passes over the training set", type=float)
    add("max_train_samples", "train on the first N examples (default: all)", type=int)
    add("max_eval_samples", "validate on the first N examples", type=int)
    add("max_steps", "stop after this many steps, checkpoint kept, continue with --resume (default: all)", type=int)
    add("batch_size", "examples per step and process", type=int)
    add("max_length", "tokens per example (prompt cut from its start)", type=int)
    from_scratch_rates = ", ".join(f"{rate} for {size}" for size, rate in defaults.LEARNING_RATE_FROM_SCRATCH.items())
    add("lr", f"peak learning rate (default: {defaults.LEARNING_RATE}, paper; from scratch: {from_scratch_rates}; "
        f"--freeze-base: {defaults.LEARNING_RATE_FROZEN_BASE})", type=float)
    add("warmup_ratio", "share of the steps spent warming the learning rate up", type=float)
    add("seed", "initialisation and batch-order seed", type=int)


def _add_stream_flags(add) -> None:
    """The streams, the loss and what trains."""
    add("num_spec_streams", "speculative streams (gamma)", type=int)
    add("num_stream_layers", "top layers the streams run in (default: the paper's share of the layers)", type=int)
    add("main_loss_weight", "a0, weight of the main stream's loss", type=float)
    add("stream_loss_weight", "a_j, weight of each stream's loss", type=float)
    add("lora_rank", "LoRA rank, 0 = full fine-tuning", type=int)
    add("freeze_base", "train only the stream parameters of the --base model")
    add("stream_adapter_rank", "rank of the streams' own adapters in the stream layers (default: "
        f"{defaults.STREAM_ADAPTER_RANK} with --freeze-base, where the streams need capacity of their own; 0 otherwise)",
        type=int)
    add("stream_targets", "what the streams learn: references (the data's next tokens), distill (the frozen "
        "base's own distribution at each later position, same forward) or greedy (references replaced by the base's "
        "greedy continuations, generated first); distill and greedy need --freeze-base (default: "
        f"{defaults.STREAM_TARGETS} with --freeze-base, references otherwise)", choices=STREAM_TARGETS)


def _add_run_flags(add) -> None:
    """Checkpoints, resuming, the output folder's guard and the device."""
    add("save_every", "steps between checkpoints (plus one at every epoch end)", type=int)
    add("resume", "continue from OUTPUT's newest checkpoint (start afresh if it has none)")
    add("overwrite", "write into an OUTPUT that holds other files or an earlier run (its model files are replaced)")
    add("mixed_precision", "auto = bf16 on a GPU that supports it, else no", choices=PRECISIONS)
    add("peak_tflops", "device peak for MFU (H100 bf16 dense)", type=float)


def parse_config(argv=None) -> FinetuneConfig:
    return FinetuneConfig(**vars(build_parser().parse_args(argv)))


# -------------------------------------------------------------------------- the run


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _processes_on_cpu() -> bool:
    """Processes started by a launcher (torchrun, ``accelerate launch --multi_gpu``) on a
    machine without a GPU: run them on the CPU, where accelerate joins them with gloo."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def check_launch() -> None:
    """A UserError when ``accelerate launch --num_processes N`` (N > 1) started one process:
    on a machine without a GPU its default launcher runs the script once (it sets
    MASTER_PORT but no WORLD_SIZE), which would silently train on one process."""
    launcher = {"ACCELERATE_MIXED_PRECISION", "MASTER_PORT"} <= os.environ.keys()
    if launcher and not {"WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"} & os.environ.keys():
        raise UserError("accelerate launch started one process where several were asked for (without a GPU its "
                        "default launcher starts one); add --multi_gpu to start them on the CPU (gloo): "
                        "accelerate launch --multi_gpu --num_processes N -m spec_stream.finetune ...")


def finetune(config: FinetuneConfig) -> dict:
    """Fine-tune as ``config`` says; returns the run's summary (losses, validation figures)."""
    check_launch()
    config = check_config(config)
    inputs = load_inputs(config)
    if inputs.summary is not None:
        remove_stale_temporaries(inputs.output)
        print(f"{inputs.output} is already fully trained; nothing to do")
        return inputs.summary
    if config.resume and inputs.resume is None:
        print(f"--resume: no checkpoint in {inputs.output}, starting fresh")
    # the schedule counts global steps: accelerate would step it once per process per step
    accelerator = Accelerator(mixed_precision=_precision(config.mixed_precision), cpu=_processes_on_cpu(),
                              step_scheduler_with_optimizer=False)
    accelerator.print(f"training on {config.dataset}/{inputs.train_split} ({len(inputs.train)} examples), "
                      f"validating on {config.dataset}/{config.eval_split} ({len(inputs.evaluation)} examples)")
    if accelerator.is_main_process:
        prepare_output(inputs)
    accelerator.wait_for_everyone()
    run = build_run(config, inputs, accelerator)
    stop = min(run.total_steps, config.max_steps) if config.max_steps else run.total_steps
    started = time.perf_counter()
    with StopSignals() as signals:
        train(run, stop, signals)
        if run.step < run.total_steps:
            accelerator.print(f"stopped at step {run.step}/{run.total_steps} (--max-steps); continue with --resume")
            return {"steps": run.step, "final_loss": run.losses[-1], "first_loss": run.first_loss}
        summary = final_evaluation(run, time.perf_counter() - started)
        signals.check(run)
        save_final(run, summary)
        signals.check(run)
    return summary


@exit_on_user_error
def main(argv=None) -> int:
    finetune(parse_config(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
