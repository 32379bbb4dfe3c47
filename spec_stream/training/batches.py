"""Training and validation batches: left-padded rows, length-bucketed global batches in a
seeded order, each split across the processes."""
from __future__ import annotations

import torch

from spec_stream import defaults
from spec_stream.training.run import Run


def make_batches(features, order, batch_size, pad_id):
    """Left-padded batches (labels -100 on padding, positions counted from each row's first
    token) in the given example order: every row's targets end at the last column, so the
    positions that carry some row's target (where the head and the streams run) are few."""
    for start in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[start : start + batch_size]]
        width = max(len(f["input_ids"]) for f in chunk)
        ids = torch.full((len(chunk), width), pad_id)
        labels = torch.full((len(chunk), width), -100)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, f in enumerate(chunk):
            n = len(f["input_ids"])
            ids[row, width - n:], labels[row, width - n:] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"])
            mask[row, width - n:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        yield {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def length_bucketed(order: list[int], lengths: list[int], global_batch: int, generator) -> list[list[int]]:
    """Global batches of similar lengths (little padding): windows of ``BUCKET_WINDOW`` global
    batches of the shuffled ``order`` are sorted by length and cut into batches, and the
    batches are shuffled again. Deterministic for the generator's seed."""
    span = global_batch * defaults.BUCKET_WINDOW
    batches = []
    for start in range(0, len(order), span):
        window = sorted(order[start:start + span], key=lambda i: lengths[i])
        batches += [window[b:b + global_batch] for b in range(0, len(window), global_batch)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def epoch_batches(run: Run, epoch: int) -> list[dict]:
    """This process's batches of ``epoch``: a seeded shuffle, length-bucketed global
    batches, each split across processes."""
    accelerator = run.accelerator
    generator = torch.Generator().manual_seed(run.config.seed + epoch)
    order = torch.randperm(len(run.features), generator=generator).tolist()
    lengths = [len(f["input_ids"]) for f in run.features]
    batches = length_bucketed(order, lengths, run.global_batch, generator)
    mine = [batch[accelerator.process_index::accelerator.num_processes] for batch in batches]
    return [next(make_batches(run.features, rows, len(rows), run.tokenizer.pad_token_id)) if rows else
            idle_batch(run, batch) for rows, batch in zip(mine, batches)]


def idle_batch(run: Run, global_rows: list[int]) -> dict:
    """The batch of a process whose share of a short last global batch is empty: one row
    without targets (loss 0, zero gradients), so that every process takes every step."""
    batch = next(make_batches(run.features, global_rows[:1], 1, run.tokenizer.pad_token_id))
    batch["labels"].fill_(-100)
    return batch
