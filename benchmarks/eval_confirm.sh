#!/usr/bin/env bash
# The confirmation run of docs/choices.md ("A fresh-seed confirmation run"), fixed before it ran:
# full attention, TCA at tau 0.9 (the defaults), one TCA variant chosen beforehand and the strongest
# baseline of the grid, on the 11 tasks at 2K/4K/8K, 80 samples per task (seeds 200-279: never used
# before), bf16, reference ops. Each (setting, length, seed range) is its own `tca eval` process,
# spread over every GPU of the host; 8K gets the most processes since it costs the most.
#
#   bash benchmarks/eval_confirm.sh OUT_DIR SECONDS   # the same OUT_DIR resumes every process
set -euo pipefail
out=${1:?usage: eval_confirm.sh OUT_DIR SECONDS}
seconds=${2:-86400}
settings=(full tca@tau0.9 "tca@tau0.9,retrieval_threshold=0.03" flexprefill@0.5)
tasks=(niah_single_number niah_single_word niah_single_uuid niah_multikey niah_multivalue niah_multiquery
       variable_tracking common_words frequent_words multi_turn_needle qa_document)
first=200 samples=80
declare -A chunks=([2048]=1 [4096]=2 [8192]=4)  # processes per (setting, length)
export TCA_BACKEND=reference PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
gpus=$(nvidia-smi -L | wc -l)
mkdir -p "$out"
python3 -c "from tca.models import load_model; load_model('smollm2')"  # the de-quantised cache, once
index=0
for length in 8192 4096 2048; do
    per=$(( samples / chunks[$length] ))
    for (( seed = first; seed < first + samples; seed += per )); do
        for setting in "${settings[@]}"; do
            name="$out/$setting-$length-$seed"
            CUDA_VISIBLE_DEVICES=$(( index % gpus )) timeout "$seconds" python3 -m tca.cli eval \
                --device cuda --dtype bfloat16 --lengths "$length" --samples "$per" --seed "$seed" \
                --batch-size 256 --batch-tokens 204800 --tasks "${tasks[@]}" --settings "$setting" \
                --out "$name.jsonl" >> "$name.log" 2>&1 &
            index=$(( index + 1 ))
        done
    done
done
wait
