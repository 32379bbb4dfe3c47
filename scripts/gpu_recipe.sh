#!/usr/bin/env bash
# The GPU recipe: on a fresh GPU machine with no network, prepare the three fine-tuned
# GPT-Neo-125M-shape checkpoints (from scratch, one epoch each: the default GPU recipe in
# spec_stream/defaults.py) and run every engine on every dataset with the GPU's default
# run sizes (same file), then plot.
#
#   scripts/gpu_recipe.sh DATA_DIR [OUTPUT_DIR] [extra dataset_tps.py arguments]
#
# DATA_DIR is laid out like shared/datasets (DATA_DIR/e2e_nlg/train.jsonl, ...). Writes
# OUTPUT_DIR/dataset_tps.json, OUTPUT_DIR/images/*.png and OUTPUT_DIR/recipe.log
# (default OUTPUT_DIR: results/gpu). Machines without rouge-score (it is not in every
# image) get it from a .whl/ folder next to this checkout when one is there:
#   pip download rouge-score nltk absl-py -d .whl      # on a machine with an index
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: scripts/gpu_recipe.sh DATA_DIR [OUTPUT_DIR] [dataset_tps.py arguments]" >&2
  exit 2
fi
data_dir=$1
output=${2:-results/gpu}
shift $(( $# >= 2 ? 2 : 1 ))
cd "$(dirname "$0")/.."
mkdir -p "$output"

if ! python -c "import rouge_score" 2>/dev/null && [ -d .whl ]; then
  pip install -q --no-index --find-links .whl rouge-score
fi
python - <<'PY' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit("error: gpu_recipe.sh needs a CUDA device; on a CPU run dataset_tps.py directly")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY

start=$(date +%s)
python dataset_tps.py --model_type all --dataset all --data-dir "$data_dir" \
  --checkpoint-dir "${CHECKPOINT_DIR:-checkpoints}" --output "$output/dataset_tps.json" \
  "$@" \
  2>&1 | tee "$output/recipe.log"
python scripts/plot_results.py "$output/dataset_tps.json" --out "$output/images"
echo "gpu_recipe: done in $(( $(date +%s) - start )) s" | tee -a "$output/recipe.log"
