"""After training: the validation figures (loss, main and stream accuracy, the streams'
and a lookup chain's acceptance on the model's own greedy text) and the final save of the
plain model with them into OUTPUT."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from spec_stream.acceptance import greedy_texts, measure_acceptance, measure_lookup_acceptance
from spec_stream import defaults
from spec_stream.checkpoints import publish_model, streams_by_default
from spec_stream.data import dataset_name, tokenize_example
from spec_stream.training.batches import make_batches
from spec_stream.training.config import dataset_of
from spec_stream.training.run import Run


@torch.no_grad()
def evaluate(model, batches, unigram_token, accelerator) -> dict:
    """Validation loss, main and per-stream top-1 accuracy on target tokens, and the
    accuracy of always predicting the most frequent training target token. The streams run
    only from just before the first target on (left-padded batches: the end of each row)."""
    model.eval()
    streams = accelerator.unwrap_model(model).config.num_spec_streams
    losses, correct, total, unigram_hits, unigram_total = [], [0] * (1 + streams), [0] * (1 + streams), 0, 0
    for batch in batches:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        losses.append(model(**batch, loss_only=True).loss.float().item())
        labels = batch["labels"]
        first = int((labels != -100).any(dim=0).nonzero()[0]) if bool((labels != -100).any()) else labels.shape[1]
        anchors = torch.arange(max(0, first - 1 - streams), labels.shape[1] - 1, device=labels.device)
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                    stream_positions=anchors if streams else None, logits_to_keep=len(anchors) + 1)
        predictions = [out.logits[:, :-1].argmax(-1)] + [out.stream_logits[:, j].argmax(-1) for j in range(streams)]
        for head, predicted in enumerate(predictions):  # head h at anchor t predicts t + 1 + h
            known = anchors + 1 + head < labels.shape[1]
            target = labels[:, anchors[known] + 1 + head]
            valid = target != -100
            correct[head] += int(((predicted[:, known] == target) & valid).sum())
            total[head] += int(valid.sum())
        targets = labels[:, 1:][labels[:, 1:] != -100]
        unigram_hits += int((targets == unigram_token).sum())
        unigram_total += targets.numel()
    model.train()
    accuracy = [c / max(t, 1) for c, t in zip(correct, total)]
    return {"eval_loss": sum(losses) / len(losses), "main_accuracy": accuracy[0],
            "stream_accuracy": accuracy[1:], "unigram_accuracy": unigram_hits / max(unigram_total, 1)}


def final_evaluation(run: Run, seconds: float) -> dict:
    """The run's summary: losses, throughput and the validation figures."""
    config, accelerator, tokenizer = run.config, run.accelerator, run.tokenizer
    task = dataset_name(dataset_of(config))
    eval_features = [tokenize_example(tokenizer, e, config.max_length) for e in run.inputs.evaluation]
    counts = torch.bincount(torch.tensor([t for f in run.features for t in f["labels"] if t != -100]))
    eval_batches = list(make_batches(eval_features, list(range(len(eval_features))), config.batch_size,
                                     tokenizer.pad_token_id))
    last = run.losses[-10:]
    summary = {"steps": run.step, "first_loss": run.first_loss, "final_loss": sum(last) / len(last),
               "train_split": f"{task}/{run.inputs.train_split}", "eval_split": f"{task}/{config.eval_split}",
               "train_tokens_per_second": run.tokens / seconds if seconds else None,
               "train_flops_per_second": run.flops / seconds if seconds else None,
               "peak_flops_per_second": run.peak_flops,
               "mfu": run.flops / seconds / run.peak_flops if seconds else None,
               **evaluate(run.model, eval_batches, int(counts.argmax()), accelerator),
               **acceptance_rates(accelerator.unwrap_model(run.model), eval_features, accelerator.device,
                                  int(counts.argmax()))}
    streams = ", ".join(f"{a:.3f}" for a in summary["stream_accuracy"]) or "none (no streams)"
    accelerator.print(f"validation loss {summary['eval_loss']:.3f}, main accuracy {summary['main_accuracy']:.3f}, "
                      f"stream accuracy {streams} (unigram {summary['unigram_accuracy']:.3f})")
    if summary["stream_acceptance"]:
        accelerator.print(acceptance_report(summary))
    return summary


def acceptance_report(summary: dict) -> str:
    """Whether the streams learned, in one line: each stream's top-1 acceptance on the
    model's own greedy text beside always drafting the most frequent target token."""
    top1 = [by_rank[0] for by_rank in summary["stream_acceptance"]]
    unigram = summary["unigram_acceptance"]
    verdict = ("the streams learned: stream 1 beats the unigram draft" if top1[0] > unigram + 0.02 else
               "the streams learned nothing beyond the unigram draft: train them longer (--epochs) or on more rows")
    return (f"stream top-1 acceptance on the model's own greedy text: {', '.join(f'{a:.3f}' for a in top1)} "
            f"(always the most frequent target token: {unigram:.3f}); {verdict}")


@torch.no_grad()
def acceptance_rates(model, features: list[dict], device, unigram_token: int) -> dict:
    """``stream_acceptance``, the streams' acceptance by depth and top-k rank
    (`measure_acceptance`), and ``lookup_acceptance``, a prompt-lookup chain's by depth
    (`measure_lookup_acceptance`), on the prompts of up to ``ACCEPTANCE_PROMPTS``
    validation examples: what ``tree_widths="auto"`` sizes the tree from, saved with the
    checkpoint, with ``mean_new_tokens``, how many tokens the greedy outputs ran (the
    expected output "auto" plans for); and ``unigram_acceptance``, the share of the greedy
    tokens that always drafting ``unigram_token`` would get right. All None for a model
    without streams."""
    if not getattr(model.config, "num_spec_streams", 0):
        return {"stream_acceptance": None, "lookup_acceptance": None, "unigram_acceptance": None,
                "mean_new_tokens": None}
    room = model.config.max_position_embeddings - defaults.ACCEPTANCE_NEW_TOKENS - model.config.num_spec_streams
    prompts = [[t for t, label in zip(f["input_ids"], f["labels"]) if label == -100][-room:]
               for f in features[:defaults.ACCEPTANCE_PROMPTS]]
    was_training = model.training
    model.eval()
    prompts = [torch.tensor([p], device=device) for p in prompts if p]
    texts = greedy_texts(model, prompts, defaults.ACCEPTANCE_NEW_TOKENS)  # both measures read the same texts
    rates = {"stream_acceptance": measure_acceptance(model, prompts, texts=texts),
             "lookup_acceptance": measure_lookup_acceptance(model, prompts, texts=texts),
             "unigram_acceptance": unigram_share(prompts, texts, unigram_token),
             "mean_new_tokens": mean_new_tokens(prompts, texts, defaults.ACCEPTANCE_NEW_TOKENS)}
    model.train(was_training)
    return rates


def mean_new_tokens(prompts: list[torch.Tensor], texts: list[torch.Tensor], cap: int) -> float | None:
    """The greedy outputs' mean length, where they end before the ``cap`` they were made to
    (at 0.9 of it or more, outputs run to the cap and their length says nothing: None)."""
    mean = sum(text.shape[1] - ids.shape[1] for ids, text in zip(prompts, texts)) / max(1, len(texts))
    return mean if mean < 0.9 * cap else None


def unigram_share(prompts: list[torch.Tensor], texts: list[torch.Tensor], token: int) -> float:
    """The share of the new tokens of ``texts`` (after each prompt) that equal ``token``."""
    new = torch.cat([text[0, ids.shape[1]:].cpu() for ids, text in zip(prompts, texts)])
    return float((new == token).float().mean()) if len(new) else 0.0


def save_final(run: Run, summary: dict) -> None:
    """The plain model (LoRA merged), tokenizer and training_args.json, into OUTPUT."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    model = accelerator.unwrap_model(run.model)
    if hasattr(model, "merge_and_unload"):  # LoRA: save a plain model
        model = model.merge_and_unload()

    generation_note = streams_by_default(model) if model.config.num_spec_streams else "a plain model: no streams"

    if summary.get("stream_acceptance"):  # tree_widths="auto" reads them at generate time
        model.generation_config.stream_acceptance = summary["stream_acceptance"]
        model.generation_config.lookup_acceptance = summary["lookup_acceptance"]
        model.generation_config.mean_new_tokens = summary["mean_new_tokens"]

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)

    print(generation_note)
    publish_model(run.inputs.output, write, {"args": dataclasses.asdict(run.config), "summary": summary})
