"""Measurement loop behind `dataset_tps.py`: the same prompts for every engine, every
input checked before the first engine starts, figures gathered into rows.

Timing. Per engine and batch size, one warm-up batch (untimed: the first prompt at batch 1),
then ``repeats`` timed passes over all prompts, the device synchronised around each call.
A pass's rate is its tokens over its seconds (at batch B: every row's tokens over the
batches' seconds, the throughput); a row reports the median rate over the passes
(``tokens_per_second``) with their spread (min, quartiles, max, IQR), the mean latency of
a prompt (its batch's seconds), and keeps each prompt's tokens, forward calls and seconds
per pass. Counts, outputs and quality come from the first pass (greedy decoding, and
sampling with its per-prompt seeds, give the same tokens in every pass; ``repeats_agree``
checks it).

Batches (``batch_sizes``). Every engine runs at every batch size, prompts grouped in order
and left-padded; engines that cannot take a batch are listed as skipped with the reason.
``speedup_vs_naive`` is over `naive` at the same batch size (upstream batched greedy).

Exactness. ``identical_to_greedy`` compares an engine's outputs with greedy decoding
(upstream `generate`, ``do_sample=False``, untimed) of the *same* model: the engine's own
weights, attention implementation and weight format (dtype, or int8). That is the output
an exact engine must reproduce. ``identical_to_naive`` compares with fp32 `naive` and so
adds the effects of the format (half precision on a GPU, int8) and of the attention
kernel: it is reported apart. Both compare with batch-1 outputs, whatever the row's batch
size. `naive` runs the reference model when one is given (``reference_model``: say the
checkpoint a frozen-base fine-tuning started from, loaded with upstream transformers), so
``identical_to_naive`` then asks whether the engine reproduces that original model.

Sampling (``do_sample``). Every engine samples with the same temperature, top-k and top-p;
prompt i (or the batch starting at prompt i) draws from torch's generators seeded with
``seed + i``. Samples cannot be compared token for token across decoders, so
``identical_to_greedy`` is null and ``distribution_check`` asks whether an engine's samples
come from naive's distribution: the mean log-probability per token of each prompt's sample
under the reference model with the same warpers, the engine's against naive's own sample of
the same prompt, by a paired z-test over the prompts (`paired_z_test`) at the strict level
``SAMPLING_CHECK_LEVEL``; a token the reference gives probability 0 (outside its top-k or
top-p) fails the check outright. It detects a shifted distribution (a wrong temperature or
truncation, a verification that favours the drafts: samples that are systematically more or
less likely than naive's); it cannot prove equality (other differences can keep the mean
log-probability; with 20 prompts it sees only large shifts; `tests/test_sampling.py` tests
exactness of speculative sampling itself), and with a normal approximation to the
statistic over few prompts a correct engine fails somewhat more often than the level says.

Which attention paths are bit-stable in half precision. A tree step verifies every node
in one call: each query attends over the cache plus the whole tree, other nodes' keys
masked out, where a greedy step attends over the cache plus one token without a mask. In
fp32 both agree to about 1e-6 and outputs match greedy decoding. In fp16/bf16:

- eager (``eager_attention``, GPT-Neo's reference) is stable in practice: it computes
  scores and softmax in fp32 from half inputs (products of half values are exact in fp32,
  masked keys add exact zeros), so only the final ``weights @ V`` runs in half, and a
  query's result seldom depends on the call's other rows or masked keys (random inputs on
  the development CPU, torch 2.13: 0 of 300 bf16 rows and 1 of 300 fp16 rows differed, by
  one half-precision step; spec_stream matched greedy on 120 of 120 random-model prompts
  in bf16 and in fp16). Not bit-exact by construction, though.
- SDPA is not: its fused kernels tile the keys into blocks and accumulate the softmax
  block by block in rounded steps, and the kernel and tiling follow the key length and
  the presence of a mask, so the same query over the same visible keys rounds differently
  in a tree step than in a one-token step (same probe: 2 of 300 bf16 rows, 17 of 300 fp16
  rows differed). At a near-tie of the top two logits the argmax flips: on the same
  random models, 6 of 120 bf16 prompts (5%) and 0 of 120 fp16 prompts differed from
  greedy decoding of the same SDPA model.
GPU kernels were not measured here (no GPU was lent); the same reasoning applies to them.

Modules, one job each: `settings` (what a run measures: `BenchmarkSettings`), `inputs` (a
task's checkpoint, reference model and prompts, checked before any engine runs), `recipe`
(the default checkpoint of a dataset, prepared once in two fine-tuning stages), `task`
(every engine at every batch size on one task), `measure` (timing and one row's figures),
`exactness` (comparisons with greedy decoding, and the check of our plain decoding against
upstream's), `distribution_check` (sampling: the paired z-test) and `machine` (the
machine a report was measured on).
"""
