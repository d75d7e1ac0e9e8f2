#!/usr/bin/env bash
# The evaluation grid behind benchmarks/results/eval-<date>.json, on every GPU of one host:
# full attention, TCA at tau 0.9-0.3, seven baselines at 10/30/50% kept, 11 tasks + perplexity,
# 2K/4K/8K tokens, 20 samples (seeds 100-119, not the seeds used while developing), and TCA
# calibrated on the bundled docs and code texts (the calibration-text study).
#
#   bash benchmarks/eval_grid.sh OUT_DIR SECONDS [PROCESSES_PER_GPU]   # the same OUT_DIR resumes
#
# The committed TCA rows were re-run on 2026-11-26 with the retrieval threshold 0.03 default by
# eval_sharded.sh (runs/tca/ of eval-2026-11-25/); a resume over that folder must leave TCA out.
set -euo pipefail
out=${1:?usage: eval_grid.sh OUT_DIR SECONDS}
seconds=${2:-86400}
per_gpu=${3:-3}
common=(--device cuda --dtype bfloat16 --lengths 2048 4096 8192 --samples 20 --seed 100
        --batch-size 256 --batch-tokens 204800)
settings=(full tca@tau0.9 tca@tau0.7 tca@tau0.5 tca@tau0.3)
for method in streaming snapkv vertical_slash flexprefill xattention topk_last random; do
    for fraction in 0.1 0.3 0.5; do settings+=("$method@$fraction"); done
done
export TCA_BACKEND=reference PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
gpus=$(nvidia-smi -L | wc -l)
mkdir -p "$out"
python3 -c "from tca import load_model; load_model('smollm2')"  # the de-quantised cache, once
index=0
for kind in docs code; do  # one process each, beside the grid's
    CUDA_VISIBLE_DEVICES=$(( index % gpus )) timeout "$seconds" python3 -m tca.cli eval "${common[@]}" \
        --settings tca@tau0.9 --calibration "$kind" --out "$out/calibration-$kind.jsonl" \
        >> "$out/calibration-$kind.log" 2>&1 &
    index=$(( index + 1 ))
done
python3 benchmarks/eval_parallel.py --gpus "$gpus" --per-gpu "$per_gpu" --out-dir "$out/main" --seconds "$seconds" \
    --settings "${settings[@]}" -- "${common[@]}" || true
wait
