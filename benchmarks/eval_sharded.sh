#!/usr/bin/env bash
# `tca eval` settings at 2K/4K/8K as many processes over every GPU of one host: each (setting,
# length, seed range) is its own process writing its own JSONL (so the same OUT_DIR resumes), and
# 8K, the costliest, gets the most processes. A setting `tca@tau0.9/docs` runs TCA calibrated on
# the docs text. SAMPLES must be a multiple of 4.
#
#   bash benchmarks/eval_sharded.sh OUT_DIR SECONDS FIRST_SEED SAMPLES SETTING... [-- TCA_EVAL_ARGS...]
set -euo pipefail
out=${1:?usage: eval_sharded.sh OUT_DIR SECONDS FIRST_SEED SAMPLES SETTING... [-- ARGS]}
seconds=$2 first=$3 samples=$4
shift 4
settings=()
while (( $# )) && [[ $1 != -- ]]; do settings+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
declare -A chunks=([2048]=1 [4096]=2 [8192]=4)  # processes per (setting, length)
export TCA_BACKEND=reference PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
gpus=$(nvidia-smi -L | wc -l)
mkdir -p "$out"
python3 -c "from tca import load_model; load_model('smollm2')"  # the de-quantised cache, once
index=0
for length in 8192 4096 2048; do
    per=$(( samples / chunks[$length] ))
    for (( seed = first; seed < first + samples; seed += per )); do
        for setting in "${settings[@]}"; do
            calibration=prose
            [[ $setting == */* ]] && calibration=${setting#*/}
            name="$out/${setting/\//+}-$length-$seed"
            CUDA_VISIBLE_DEVICES=$(( index % gpus )) timeout "$seconds" python3 -m tca.cli eval \
                --device cuda --dtype bfloat16 --lengths "$length" --samples "$per" --seed "$seed" \
                --batch-size 256 --batch-tokens 204800 --settings "${setting%/*}" --calibration "$calibration" \
                --out "$name.jsonl" "$@" >> "$name.log" 2>&1 &
            index=$(( index + 1 ))
        done
    done
done
wait
