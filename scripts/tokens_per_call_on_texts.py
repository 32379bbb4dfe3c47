"""Tokens per call of several checkpoints' streams on the same texts.

    python scripts/tokens_per_call_on_texts.py --dataset dialogsum --data-dir DIR \
        --original runs/base runs/full runs/frozen

Two fine-tuned copies of one model decode different texts when one of them moved its main
stream, so their tokens per call on their own outputs compare the texts as much as the
streams. This takes the ``--original`` checkpoint's greedy outputs (up to its end of
sequence) on ``--num-samples`` test prompts and replays a ``--tree-widths`` tree's steps
on them for every checkpoint named (the original first), each with its own streams
(`spec_stream.acceptance.replayed_accepted_lengths`): tokens over calls (the prefill's included), as
decoding would count them. For a frozen-base copy of the original, it is exactly its own
decoding's. No timing: any machine load is fine. Prints one line per checkpoint.
"""
from __future__ import annotations

import argparse
import sys

import torch

from huggingface.transformers.generation.speculative_tree import AUTO, TreeSpec, parse_tree
from spec_stream.acceptance import greedy_texts, replayed_accepted_lengths
from spec_stream.checkpoints import check_path_text, load_for_inference
from spec_stream.cli_help import PlainDefaultsHelpFormatter
from spec_stream.data import default_split, load_examples, resolve_tasks
from spec_stream.errors import UserError, exit_on_user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=PlainDefaultsHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="checkpoints fine-tuned from --original")
    parser.add_argument("--original", required=True, help="the checkpoint whose greedy outputs are the texts")
    parser.add_argument("--dataset", required=True, help="a preset: spider, dialogsum or e2e_nlg")
    parser.add_argument("--data-dir", default=None, help="local JSON-lines copies (default: the hub)")
    parser.add_argument("--num-samples", type=int, default=200, help="test prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="new tokens of each greedy text at most")
    parser.add_argument("--tree-widths", default=str(TreeSpec()), help="top-k per stream, e.g. 4,3,2")
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def tree_argument(text: str) -> TreeSpec:
    """--tree-widths as a tree (the replay needs concrete widths: no "auto")."""
    try:
        tree = parse_tree(text)
    except ValueError as error:
        raise UserError(f"--tree-widths: {error}") from None
    if tree == AUTO:
        raise UserError("--tree-widths auto: the replay needs concrete widths, e.g. 4,3,2")
    return tree


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    tree = tree_argument(args.tree_widths)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        raise UserError("--num-samples and --max-new-tokens must be at least 1")
    if resolve_tasks(args.dataset) != [args.dataset]:
        raise UserError(f"--dataset {args.dataset!r}: name one preset (spider, dialogsum or e2e_nlg)")
    for flag, path in [("--original", args.original), ("--data-dir", args.data_dir)] + [("checkpoint", path)
                                                                                        for path in args.checkpoints]:
        check_path_text(path, flag)
    original, tokenizer = load_for_inference(args.original, require_streams=True)
    models = [(path, load_for_inference(path, require_streams=True)[0]) for path in args.checkpoints]
    for path, model in [(args.original, original)] + models:
        try:
            tree.check_streams(model.config.num_spec_streams, path)
        except ValueError as error:
            raise UserError(f"--tree-widths: {error}") from None
    room = original.config.max_position_embeddings - args.max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the context of "
                        f"{original.config.max_position_embeddings} tokens; lower --max-new-tokens")
    examples = load_examples(args.dataset, default_split(args.dataset, "test"), data_dir=args.data_dir,
                             limit=args.num_samples)
    prompts = [tokenizer(e.prompt, return_tensors="pt").input_ids[:, -room:] for e in examples]
    with torch.no_grad():
        texts = greedy_texts(original.eval(), prompts, args.max_new_tokens)
        tokens = sum(text.shape[1] - ids.shape[1] for ids, text in zip(prompts, texts))
        print(f"{len(prompts)} prompts of {args.dataset}, {tokens} tokens of {args.original}'s greedy output, "
              f"tree {args.tree_widths}")
        for path, model in [(args.original, original)] + models:
            calls = sum(1 + len(replayed_accepted_lengths(model.eval(), text, ids.shape[1], tree.widths))
                        for ids, text in zip(prompts, texts))
            print(f"{path}: {tokens / calls:.3f} tokens per call ({calls} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
