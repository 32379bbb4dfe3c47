"""Fine-tune the speculative streams (SPEC_STREAM.md section 2) with `accelerate`.

    python -m spec_stream.finetune --dataset e2e_nlg --output runs/e2e --from-scratch tiny --data-dir DIR
    accelerate launch -m spec_stream.finetune --dataset spider --output runs/sql --base EleutherAI/gpt-neo-125m

Loss ``a0 * CE(main) + a_j * sum_j CE(stream_j)`` on target tokens only. Modes: full
fine-tuning (default), LoRA (`--lora-rank R`, merged before the final save) and
`--freeze-base` (only `transformer.streams.*` trains: the main stream stays the base model
bit for bit). `--train-pruner` adds ``0.1 * CE(early-exit logits, next token)``, trained
jointly. A checkpoint (`OUTPUT/checkpoint-last`) is written atomically every
`--save-every` steps and at the end of each epoch; `--resume` continues from it exactly
(same batch order, optimizer and scheduler state). The final model, tokenizer and
`training_args.json` go to OUTPUT, loadable by `from_pretrained` and `dataset_tps.py`.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from spec_stream import GPTNeoConfig, GPTNeoForCausalLM, shifted_cross_entropy
from spec_stream.checkpoints import (MODEL_SIZES, TRAINING_ARGS, atomic_directory, build_from_scratch, load_base,
                                     write_json)
from spec_stream.data import TASKS, get_task, load_examples, tokenize_example
from spec_stream.errors import UserError, exit_on_user_error

PRUNER_LOSS_WEIGHT = 0.1
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spec_stream.finetune", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="spider, dialogsum or e2e_nlg")
    p.add_argument("--output", required=True, help="folder for the final model and checkpoint-last/")
    p.add_argument("--data-dir", default=None, help="local JSON-lines copies (default: $SPEC_STREAM_DATA_DIR, then the hub)")
    p.add_argument("--from-scratch", default=None, metavar="SIZE", help=f"one of {', '.join(MODEL_SIZES)}")
    p.add_argument("--base", default=None, metavar="PATH_OR_HUB_ID", help="a GPT-Neo checkpoint to fine-tune")
    p.add_argument("--train-split", default=None, help="default: train")
    p.add_argument("--eval-split", default="validation", help="split for the validation pass")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-eval-samples", type=int, default=200)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (checkpoint kept)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=None, help="default 5e-4 (paper); 3e-3 for a tiny model from scratch")
    p.add_argument("--warmup-ratio", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-spec-streams", type=int, default=3)
    p.add_argument("--num-stream-layers", type=int, default=None, help="default: paper's share of the layers")
    p.add_argument("--main-loss-weight", type=float, default=1.0)
    p.add_argument("--stream-loss-weight", type=float, default=0.1)
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full fine-tuning")
    p.add_argument("--freeze-base", action="store_true", help="train only the stream parameters")
    p.add_argument("--train-pruner", action="store_true", help="also train the tree-pruning adapter")
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint-last if present")
    p.add_argument("--mixed-precision", choices=("auto", "no", "bf16", "fp16"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 bf16 dense)")
    return p


def check_args(args) -> None:
    get_task(args.dataset)
    if args.from_scratch and args.base:
        raise UserError("--from-scratch and --base exclude each other; pick one")
    if not args.from_scratch and not args.base:
        args.from_scratch = "tiny"
    if args.lr is None:
        args.lr = 3e-3 if args.from_scratch == "tiny" else 5e-4
    if args.from_scratch and args.from_scratch not in MODEL_SIZES:
        raise UserError(f"unknown --from-scratch size {args.from_scratch!r}; choose one of {', '.join(MODEL_SIZES)}")
    for name in ("epochs", "batch_size", "max_length", "save_every", "lr"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_spec_streams < 1:
        raise UserError("--num-spec-streams must be at least 1: fine-tuning trains the streams")
    if args.freeze_base and args.lora_rank:
        raise UserError("--freeze-base and --lora-rank exclude each other: freeze-base trains only the streams")


def make_batches(features, order, batch_size, pad_id):
    """Right-padded batches (labels -100 on padding) in the given example order."""
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        width = max(len(f["input_ids"]) for f in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, f in enumerate(chunk):
            n = len(f["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask}


def compute_loss(model, batch, train_pruner):
    out = model(**batch, early_exit=train_pruner)
    loss = out.loss
    if train_pruner:
        loss = loss + PRUNER_LOSS_WEIGHT * shifted_cross_entropy(out.early_exit_logits, batch["labels"], 1)
    return loss, out


@torch.no_grad()
def evaluate(model, batches, unigram_token, accelerator) -> dict:
    """Validation loss, main and per-stream top-1 accuracy on target tokens, and the
    accuracy of always predicting the most frequent training target token."""
    model.eval()
    losses, correct, total, unigram_hits, unigram_total = [], None, None, 0, 0
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = model(**batch)
        losses.append(out.loss.float().item())
        labels = batch["labels"]
        heads = [out.logits] + list(out.stream_logits.unbind(1))
        hits, counts = [], []
        for shift, logits in enumerate(heads, start=1):
            target = labels[:, shift:]
            valid = target != -100
            predicted = logits[:, : labels.shape[1] - shift].argmax(-1)
            hits.append(((predicted == target) & valid).sum().item())
            counts.append(valid.sum().item())
        correct = hits if correct is None else [a + b for a, b in zip(correct, hits)]
        total = counts if total is None else [a + b for a, b in zip(total, counts)]
        targets = labels[:, 1:][labels[:, 1:] != -100]
        unigram_hits += (targets == unigram_token).sum().item()
        unigram_total += targets.numel()
    model.train()
    accuracy = [c / max(t, 1) for c, t in zip(correct, total)]
    return {"eval_loss": sum(losses) / len(losses), "main_accuracy": accuracy[0],
            "stream_accuracy": accuracy[1:], "unigram_accuracy": unigram_hits / max(unigram_total, 1)}


def select_trainable(model, args):
    if args.freeze_base:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = "transformer.streams." in name
        return model
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                 target_modules=LORA_TARGETS, lora_dropout=0.0))
        for name, parameter in model.named_parameters():
            if "transformer.streams." in name:
                parameter.requires_grad = True
    return model


def finetune(args) -> dict:
    check_args(args)
    accelerator = Accelerator(mixed_precision=_precision(args.mixed_precision))
    say = accelerator.print
    output = Path(args.output)
    checkpoint = output / "checkpoint-last"
    state = torch.load(checkpoint / "state.pt", weights_only=False) if args.resume and (checkpoint / "state.pt").is_file() else None
    if args.resume and state is None:
        say(f"--resume: no checkpoint in {checkpoint}, starting fresh")
    if state and state.get("finished") and (output / TRAINING_ARGS).is_file():
        say(f"{output} is already fully trained; nothing to do")
        return state["summary"]

    task = TASKS[get_task(args.dataset).name]
    train_split = args.train_split or task.train_split
    train = load_examples(task.name, train_split, args.data_dir, args.max_train_samples)
    evaluation = load_examples(task.name, args.eval_split, args.data_dir, args.max_eval_samples)
    say(f"training on {task.name}/{train_split} ({len(train)} examples), "
        f"validating on {task.name}/{args.eval_split} ({len(evaluation)} examples)")

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if state:  # shapes and tokenizer were saved with the checkpoint, weights in state.pt
        model = GPTNeoForCausalLM(GPTNeoConfig.from_pretrained(checkpoint))
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    elif args.from_scratch:
        model, tokenizer = build_from_scratch(args.from_scratch, [e.prompt + e.target for e in train],
                                              args.num_spec_streams, args.num_stream_layers, task.name)
    else:
        model, tokenizer = load_base(args.base, args.num_spec_streams, args.num_stream_layers, task.name)
    model.config.main_loss_weight, model.config.stream_loss_weight = args.main_loss_weight, args.stream_loss_weight
    model = select_trainable(model, args)
    if state:
        model.load_state_dict(state["model"])

    features = [tokenize_example(tokenizer, e, args.max_length) for e in train]
    eval_features = [tokenize_example(tokenizer, e, args.max_length) for e in evaluation]
    counts = torch.bincount(torch.tensor([t for f in features for t in f["labels"] if t != -100]))
    unigram_token = int(counts.argmax())

    global_batch = args.batch_size * accelerator.num_processes
    steps_per_epoch = math.ceil(len(features) / global_batch)
    total_steps = max(1, math.ceil(steps_per_epoch * args.epochs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    step, first_loss, losses = 0, None, []
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, first_loss, losses = state["step"], state["first_loss"], state["losses"]
        say(f"resuming from {checkpoint} at step {step}/{total_steps}")

    model.train()
    stop = min(total_steps, args.max_steps) if args.max_steps else total_steps
    progress = tqdm(total=total_steps, initial=step, desc=f"fine-tuning {task.name}",
                    disable=not accelerator.is_local_main_process)
    tokens, started = 0, time.perf_counter()
    while step < stop:
        epoch, offset = divmod(step, steps_per_epoch)
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        mine = [i for b in range(0, len(order), global_batch) for i in
                order[b:b + global_batch][accelerator.process_index::accelerator.num_processes]]
        for batch in list(make_batches(features, mine, args.batch_size, tokenizer.pad_token_id))[offset:]:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            loss, _ = compute_loss(model, batch, args.train_pruner)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            value = accelerator.gather(loss.detach()[None]).mean().item()
            first_loss = value if first_loss is None else first_loss
            losses.append(value)
            progress.update(1)
            progress.set_postfix(loss=f"{value:.3f}")
            if step % args.save_every == 0 or step == stop or step % steps_per_epoch == 0:
                save_state(accelerator, model, optimizer, scheduler, tokenizer, checkpoint, step, first_loss, losses)
            if step >= stop:
                break
    progress.close()
    seconds = time.perf_counter() - started
    if step < total_steps:
        say(f"stopped at step {step}/{total_steps} (--max-steps); continue with --resume")
        return {"steps": step, "final_loss": losses[-1], "first_loss": first_loss}

    eval_batches = list(make_batches(eval_features, list(range(len(eval_features))), args.batch_size,
                                     tokenizer.pad_token_id))
    summary = {"steps": step, "first_loss": first_loss, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
               "train_split": f"{task.name}/{train_split}", "eval_split": f"{task.name}/{args.eval_split}",
               "train_tokens_per_second": tokens / seconds if seconds else None,
               **evaluate(model, eval_batches, unigram_token, accelerator)}
    if accelerator.device.type == "cuda":
        parameters = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
        summary["mfu"] = 6 * parameters * summary["train_tokens_per_second"] / (args.peak_tflops * 1e12)
    say(f"validation loss {summary['eval_loss']:.3f}, main accuracy {summary['main_accuracy']:.3f}, stream "
        f"accuracy {', '.join(f'{a:.3f}' for a in summary['stream_accuracy'])} (unigram {summary['unigram_accuracy']:.3f})")
    save_final(accelerator, model, tokenizer, output, args, summary)
    save_state(accelerator, model, optimizer, scheduler, tokenizer, checkpoint, step, first_loss, losses, summary)
    return summary


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def save_state(accelerator, model, optimizer, scheduler, tokenizer, checkpoint, step, first_loss, losses, summary=None):
    """Everything `--resume` needs, written atomically."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(model)
    with atomic_directory(checkpoint) as folder:
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        base.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        torch.save({"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "step": step,
                    "first_loss": first_loss, "losses": losses, "finished": summary is not None,
                    "summary": summary}, folder / "state.pt")


def save_final(accelerator, model, tokenizer, output, args, summary):
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(model)
    if hasattr(model, "merge_and_unload"):  # LoRA: save a plain model
        model = model.merge_and_unload()
    checkpoint = output / "checkpoint-last"
    with atomic_directory(output) as folder:
        if checkpoint.exists():
            checkpoint.rename(folder / "checkpoint-last")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_json(folder / TRAINING_ARGS, {"args": vars(args), "summary": summary})


@exit_on_user_error
def main(argv=None) -> int:
    finetune(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
