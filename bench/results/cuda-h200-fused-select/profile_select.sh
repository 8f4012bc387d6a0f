#!/usr/bin/env bash
# Per-kernel GPU durations of the CUDA selection (Nsight Compute, clocks and caches as found), cold and
# warm, for a few configurations of bench/attention.py's select mode. Run from the repository root on the
# GPU machine after bench/cuda_device.sh --stages build:
#   bash bench/results/cuda-h200-fused-select/profile_select.sh OUTDIR [CONFIGS...]
# CONFIGS: "n_kv,d,heads" (default 32k,128,8/4 128k,256,16/8 32k,128,28/4). Prints mean us per kernel.
set -uo pipefail
out=$1; shift
cfgs=("$@"); [ ${#cfgs[@]} -eq 0 ] && cfgs=(32k,128,8/4 128k,256,16/8 32k,128,28/4)
export PYTHONPATH=$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH}
here=$(dirname "$0")
kernels='regex:row_positions|prologue|keysim|segment_cuts|kc_and_bounds|chunk_scores|select_ranges|finish_kernel|control_kernel'
for cfg in "${cfgs[@]}"; do
    IFS=, read -r nkv d heads <<< "$cfg"
    for warm in cold warm; do
        flag=""; [ $warm = warm ] && flag=--warm-cache
        name="ncu-$nkv-$d-${heads/\//_}-$warm"
        ncu --csv --metrics gpu__time_duration.sum --cache-control none --clock-control none -k "$kernels" \
            python3 bench/attention.py --device cuda --modes select $flag --n-kv "$nkv" --d "$d" --heads "$heads" \
            --budgets 0.3 --repeats 5 --no-json > "$out/$name.csv" 2> "$out/$name.err"
        echo "== $cfg $warm"
        python3 "$here/ncu_summary.py" "$out/$name.csv"
    done
done
