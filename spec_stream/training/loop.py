"""The training loop: the loss of a step, shared fairly across processes, the optimizer
steps up to the end or ``--max-steps``, a checkpoint (`save_state`) every ``--save-every``
steps and at each epoch end, and SIGTERM / Ctrl-C turned into a saved step (`StopSignals`)."""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from spec_stream import defaults
from spec_stream.arithmetic import ModelShape, forward_flops
from spec_stream.checkpoints import STATE_FILE, save_checkpoint
from spec_stream.training.batches import epoch_batches
from spec_stream.training.config import resume_settings
from spec_stream.training.run import Run


def compute_loss(model, batch, distill_streams=False):
    """The training loss (streams only where they have targets, the head only on target rows:
    ``loss_only`` of `GPTNeoForCausalLM.forward`)."""
    return model(**batch, loss_only=True, distill_streams=distill_streams).loss


def target_share(accelerator: Accelerator, labels: torch.Tensor):
    """The factor that makes this process's mean loss its part of the global batch's mean:
    its share of the batch's target tokens times the process count (DDP averages the
    processes' gradients). So the loss curve and the updates do not depend on how a global
    batch is split (exactly when every prompt has more tokens than there are streams, so
    each stream's targets are the main stream's). 1 on one process."""
    if accelerator.num_processes == 1:
        return 1.0
    local = (labels[:, 1:] != -100).sum()
    total = accelerator.reduce(local.clone(), reduction="sum")
    return local * accelerator.num_processes / total.clamp(min=1)


def batch_flops(shape: ModelShape, batch: dict, frozen_base: bool = False) -> float:
    """Matmul FLOPs of one training step on ``batch``, counting the rows the model really
    runs: every token through every layer, stream rows at the target positions through the
    top layers, the head on target rows. Backward costs twice the forward of what it goes
    through: everything, or with ``frozen_base`` the stream layers and the stream heads."""
    total = 0.0
    top = dataclasses.replace(shape, layers=shape.stream_layers)
    for tokens, targets in zip(batch["attention_mask"].sum(dim=1).tolist(),
                               (batch["labels"] != -100).sum(dim=1).tolist()):
        stream_rows = shape.streams * (targets + shape.streams)
        forward = forward_flops(shape, tokens, 0, logits_rows=targets + stream_rows, stream_rows=stream_rows)
        backward = forward_flops(top, tokens, 0, logits_rows=stream_rows, stream_rows=stream_rows) \
            if frozen_base else forward
        total += forward + 2 * backward
    return total


def train_step(run: Run, batch: dict) -> float:
    """One optimizer step; returns the loss averaged over processes."""
    accelerator = run.accelerator
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    loss = compute_loss(run.model, batch, run.config.stream_targets == "distill")
    loss = loss * target_share(accelerator, batch["labels"])
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(run.model.parameters(), defaults.GRAD_CLIP_NORM)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad()
    run.step += 1
    run.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
    run.flops += batch_flops(run.shape, batch, run.config.freeze_base) * accelerator.num_processes
    value = accelerator.gather(loss.detach()[None]).mean().item()
    run.first_loss = value if run.first_loss is None else run.first_loss
    run.losses.append(value)
    return value


def train(run: Run, stop: int, signals: StopSignals) -> None:
    """Steps up to ``stop``, a checkpoint every --save-every steps, at each epoch end, at
    ``stop``, and before leaving on SIGTERM / SIGINT."""
    run.model.train()
    progress = tqdm(total=run.total_steps, initial=run.step, desc=f"fine-tuning {run.config.dataset}",
                    disable=not run.accelerator.is_local_main_process)
    started, tokens, flops = time.perf_counter(), run.tokens, run.flops
    while run.step < stop:
        epoch, offset = divmod(run.step, run.steps_per_epoch)
        for batch in epoch_batches(run, epoch)[offset:]:
            value = train_step(run, batch)
            seconds = time.perf_counter() - started
            progress.update(1)
            progress.set_postfix(loss=f"{value:.3f}", tok_s=f"{(run.tokens - tokens) / seconds:.0f}",
                                 mfu=f"{(run.flops - flops) / seconds / run.peak_flops:.1%}")
            step = run.step
            if step % run.config.save_every == 0 or step == stop or step % run.steps_per_epoch == 0:
                save_state(run)
            signals.check(run)
            if step >= stop:
                break
    progress.close()


def save_state(run: Run) -> None:
    """Publish ``checkpoint-<step>``: everything `--resume` needs, as tensors and primitives
    (loaded with ``weights_only=True``)."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    run.saved_step = run.step
    if not accelerator.is_main_process:
        return
    unwrapped = accelerator.unwrap_model(run.model)
    base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
    state = {"model": unwrapped.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "step": run.step,
             "first_loss": run.first_loss, "losses": list(run.losses), "settings": resume_settings(run.config)}

    def write(folder: Path) -> None:
        base.config.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)
        torch.save(state, folder / STATE_FILE)

    save_checkpoint(run.inputs.output, run.step, write)


class StopSignals:
    """While active, SIGTERM and SIGINT (Ctrl-C) only take note; :meth:`check`, called
    after every finished step, then saves a checkpoint and leaves with exit status 143
    (SIGTERM) or 130 (SIGINT, as KeyboardInterrupt). A second signal stops at once."""

    HANDLED = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only there can Python handle signals
            self.previous = {number: signal.signal(number, self._note) for number in self.HANDLED}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        if self.received is not None:
            self._leave(number)
        self.received = number

    def _leave(self, number: int) -> None:
        if number == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + number)

    def check(self, run: Run) -> None:
        """Leave (after saving this step, unless just saved) when any process got a signal."""
        number = self.received or 0
        if run.accelerator.num_processes > 1:
            number = int(run.accelerator.gather(torch.tensor([number], device=run.accelerator.device)).max())
        if not number:
            return
        if run.saved_step != run.step:
            save_state(run)
        if run.accelerator.is_main_process:
            print(f"{signal.Signals(number).name}: saved step {run.step} in {run.inputs.output}/checkpoint-{run.step};"
                  " continue with --resume", file=sys.stderr)
        self._leave(number)
