"""Every default of spec-stream, set once, each with the reason for its value.

The model and its `generate` live in the patched `transformers` layer (`huggingface/`),
which cannot import this package; the defaults that layer needs (the draft tree, the
prefill buckets of the one runner, the probe trees of "auto", the loss weights) are defined there, next to the code
that uses them, and re-exported
here so that this module lists them all. Everything else is defined here and nowhere else:
command-line parsers, the benchmark and the fine-tuning code read their defaults from it.
"""
from __future__ import annotations

from huggingface.transformers.generation.fixed_shape import DEFAULT_PREFILL_BUCKETS  # prompt-length graphs
from huggingface.transformers.generation.speculative_tree import DEFAULT_TREE_WIDTHS  # (4, 3, 2): the paper's tree
from huggingface.transformers.generation.tree_search import MIN_GAIN, PROBE_CONTEXTS, PROBE_TREES  # "auto": a tree
# only if expected 1.1x faster than the one-token step; step costs probed after 64 and 512 tokens, on nine trees
from huggingface.transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoConfig

# -- the method --------------------------------------------------------------------------
MAIN_LOSS_WEIGHT = GPTNeoConfig.main_loss_weight  # a0 = 1.0: the main stream is the model itself
STREAM_LOSS_WEIGHT = GPTNeoConfig.stream_loss_weight  # a_j = 0.1 (paper): streams must not hurt the main stream
NUM_SPEC_STREAMS = 3  # gamma: the paper's 3-4; a 4th stream rarely survives verification on small models
STREAM_ADAPTER_RANK = 16  # --freeze-base: the streams' own low-rank capacity (the base's weights cannot move)
STREAM_TARGETS = "distill"  # --stream-targets: the frozen base's own distribution (docs/method.md, stream stage)
GREEDY_TARGETS_BATCH = 16  # --stream-targets greedy: prompts per batched greedy generate
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj")  # every linear layer of a block

# -- fine-tuning ---------------------------------------------------------------------------
LEARNING_RATE = 5e-4  # paper recipe for fine-tuning a pretrained model
LEARNING_RATE_FROM_SCRATCH = {  # a model from scratch learns too little in one CPU budget at the fine-tuning rate
    "tiny": 3e-3,  # 0.3M parameters: nothing useful at 5e-4
    "small": 1e-3,  # 4M: E2E-NLG BLEU 0.59 after 10,000 rows (5e-4 needs about twice the rows)
}
LEARNING_RATE_FROZEN_BASE = 1e-3  # --freeze-base: adapters start at zero; with 1.33 epochs (full's time) it beat full fine-tuning (docs/method.md)
WARMUP_RATIO = 0.02  # a short warm-up keeps AdamW's first steps from blowing up fresh stream embeddings
BATCH_SIZE = 16  # per process; fits a 125M model at length 512 in 16 GiB and keeps CPU steps short
MAX_LENGTH = 512  # covers 99% of DialogSum prompt + summary with the from-scratch tokenizers
MAX_EVAL_SAMPLES = 200  # enough for stream accuracies to +-0.01, quick on a CPU
SAVE_EVERY = 500  # steps between resumable checkpoints (plus one at every epoch end)
GPU_PEAK_TFLOPS = 989.0  # H100 bf16 dense: the denominator of MFU on a GPU
FROM_SCRATCH_SIZE = "small"  # without --base: the size whose output is worth reading yet trains in minutes on 2 cores
EPOCHS = 1.0  # one pass: the streams learn from the same data the main stream already fits
EVAL_SPLIT = "validation"  # every task has one; the benchmark split stays unseen
SEED = 0  # fixes the from-scratch initialisation and the batch order of every epoch
LORA_RANK = 0  # full fine-tuning unless asked: the models here are small enough
BUCKET_WINDOW = 50  # global batches sorted by length together: little padding, batches still varied
GRAD_CLIP_NORM = 1.0  # the usual transformer clip; fresh stream embeddings spike early
MIXED_PRECISION = "auto"  # bf16 on a GPU that has it, fp32 elsewhere: on a CPU with AVX512-BF16, bf16 trained 1.63x
# faster but a from-scratch small base lost quality (E2E-NLG BLEU 51.8 -> 47.7, DialogSum ROUGE-L 0.204 -> 0.185)

# -- your own data ---------------------------------------------------------------------------
HOLDOUT_SHARE = 0.1  # a single file's rows held out for validation and again for test: 80/10/10, the usual
HOLDOUT_SEED = 0  # fixed, not --seed: one file always gives the same test rows to training and benchmark
ACCEPTANCE_PROMPTS = 32  # validation prompts whose stream acceptance sizes "auto" trees: rates to about +-0.03
ACCEPTANCE_NEW_TOKENS = 48  # greedy tokens per prompt the acceptance is measured over (the benchmark makes 64)
TREE_WIDTHS_SAVED = "auto"  # the tree a fine-tuned checkpoint asks generate for: the fastest for the device

# -- default checkpoints the benchmark prepares once per dataset, in two stages ---------------
# Stage 1, the base: main stream and streams together (the paper's loss), from scratch offline
# or on a CPU, else fine-tuned from PRETRAINED_BASE. Stage 2, the streams: --freeze-base on
# stage 1, the streams and their adapters learn STREAM_TARGETS (docs/method.md, section 2).
# Rows per task (None: the whole split); "custom": your own data.
PRETRAINED_BASE = "EleutherAI/gpt-neo-125m"  # the paper fine-tunes pretrained models: on a GPU with the hub
DEFAULT_RECIPES = {
    # small: E2E-NLG BLEU >= 50 from 10,000 rows, DialogSum ROUGE-L 0.2 from 3,000; Spider learns no SQL from
    # scratch in minutes at any row count here, so it gets fewer; stage 2 rows: where its gain levels off per minute
    "cpu": dict(size="small", epochs=1, max_train_samples=dict(e2e_nlg=10000, dialogsum=3000, spider=3000,
                                                               custom=4000),
                stream_epochs=1, stream_train_samples=dict(e2e_nlg=1500, dialogsum=1000, spider=1000, custom=1000)),
    "cuda": dict(size="125M", epochs=1, max_train_samples=dict(e2e_nlg=None, dialogsum=None, spider=None,
                                                               custom=None),  # GPT-Neo-125M shape, whole splits
                 stream_epochs=1, stream_train_samples=dict(e2e_nlg=None, dialogsum=None, spider=None, custom=None)),
}

# -- the benchmark -------------------------------------------------------------------------
DATASETS = ("spider", "dialogsum", "e2e_nlg")  # the paper's three tasks, in its order
NUM_SAMPLES = {"cpu": 50, "cuda": 50}  # prompts per dataset: enough for a median and spread, minutes on 2 cores
MAX_NEW_TOKENS = {"cpu": 64, "cuda": 128}  # long enough for several tree steps per prompt
PROMPT_LOOKUP_TOKENS = 10  # transformers' own default for prompt_lookup_num_tokens
REFERENCE_CHECK_PROMPTS = 3  # before timing: our plain greedy must equal upstream's on these (a broken install shows at once)
REPEATS = 3  # timed passes over the prompts per engine: the fewest that give a median and a spread
HALF_DTYPE = "fp16"  # half precision of the GPU engines: every CUDA GPU has it, bf16 needs Ampere
SEED_LIMIT = 2**32  # seeds from 0 to SEED_LIMIT - 1: what numpy (seeded by accelerate) takes
REPORT_PATH = "results/dataset_tps.json"  # where the benchmark's JSON goes; the plots read it
CHECKPOINT_DIR = "checkpoints"  # default checkpoints, prepared once and reused by later runs
LOOKUP_BRANCH = dict(spider=4, dialogsum=0, e2e_nlg=0, custom=0)  # spec_stream's prompt-lookup chain (nodes):
# SQL repeats the schema's names and itself (15 Spider prompts: 2.88 tokens per call with 4 nodes against 1.85
# without, +40% tokens/s); on DialogSum and E2E-NLG the chain is rarely accepted and cost 4.5-7% of tokens/s
BENCHMARK_TREE_WIDTHS = "auto"  # spec_stream's tree: the fastest for the checkpoint on this device, as generate's
COMPILE_STEP_ON_CPU = True  # spec_stream and static at batch 1 on a CPU: torch.compile of the one step ran
# the E2E-NLG small checkpoint's steps 1.2-1.5x faster than eager up to (1,1,1) (README, step costs)
BENCHMARK_BATCH_SIZES = (1,)  # --batch-size: one prompt at a time unless asked, the latency setting of the paper
SAMPLE_TEMPERATURE = 0.7  # --do-sample: issue 14's temperature, between greedy and the raw distribution
SAMPLE_TOP_K = 50  # transformers' own default top_k when sampling (0 turns it off)
SAMPLE_TOP_P = 1.0  # off: top-k alone already trims the tail
SAMPLE_SEED = 0  # prompt i samples with seed SAMPLE_SEED + i: every engine, every pass, reproducible
SAMPLING_CHECK_LEVEL = 1e-3  # strict: a correct engine fails the distribution check about once in 1,000 rows

# -- inference arithmetic and the attention micro-benchmark ---------------------------------
ARITHMETIC_CONTEXT = 256  # cached tokens when decoding: a typical prompt plus answer of the three tasks
ARITHMETIC_BATCH = 16  # a serving batch: the predicted bound beside naive's row at --batch-size 16
PROBE_REPEATS = 5  # median of 5 after a warm-up: steady to a few % in about a second on a CPU
ATTENTION_TOKENS = (400, 800, 1200, 1600, 2000)  # issue 13's shapes (tokens x 400)
ATTENTION_EMBEDDING = 400  # one head of width 400, as issue 13 specifies
ATTENTION_BATCHES = (8, 16, 32, 64, 128, 256, 512)  # issue 13's sweep, doubling
ATTENTION_SWEEP_TOKENS = 2000  # batch sweep at the largest shape: there memory runs out first
ATTENTION_SWEEP_BATCH = 32  # token sweep at a batch every method fits at 2000 tokens on 24 GiB
ATTENTION_REPEATS = 5  # timed calls per point after a warm-up call (median and min-max)
ATTENTION_SECONDS = 20.0  # fewer repeats (at least 3) once a point's calls pass this many seconds
ATTENTION_MEMORY_SHARE = 0.7  # a point runs only if its predicted peak fits this share of free memory

__all__ = [name for name in dir() if name.isupper()]  # noqa: F822 (re-exports included)
