#!/usr/bin/env bash
# One device-tool call: build, tests, per-kernel profile and the attention benchmark, each stage bounded so
# that the whole stays under a deadline (seconds, default 570). Run from the repository root:
#   PYDHSA_LLAMA_CPP_DIR=... bash bench/results/cuda-h200-fused-select/run_device.sh OUT STAGES [DEADLINE]
# STAGES: comma-separated from build, test_op_cuda, test_op_backends, test_cuda_e2e, profile, attention,
# attention-warm (budget 0.3), pdl (the select mode with and without programmatic dependent launch).
# PROFILE_CONFIGS: the profile stage's configurations (see profile_select.sh).
set -uo pipefail
out=$1; stages=$2; deadline=${3:-570}
here=$(dirname "$0")
has() { case ",$stages," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
left() { local l=$(( deadline - SECONDS )); echo $(( l > 1 ? l : 1 )); }
stamp() { echo "== $(date +%T) [${SECONDS}s] $*"; }
export PYTHONPATH=$PWD/.device/site PYTHONUNBUFFERED=1
if has build; then
    stamp build
    bash bench/cuda_device.sh --stages build --out /tmp/cdout 2>&1 | tail -4 || { tail -80 /tmp/cdout/build.log; cp /tmp/cdout/build.log "$out/"; echo BUILD FAILED; exit 1; }
fi
for t in test_op_cuda test_op_backends test_cuda_e2e; do
    if has $t; then
        stamp "$t"
        (cd /tmp && timeout $(left) python3 -m pytest -q -rs --capture=sys -p no:cacheprovider "$OLDPWD/tests/$t.py" 2>&1) \
            > "$out/$t.log"; echo "rc=$?"; tail -6 "$out/$t.log"
    fi
done
grid=(--n-kv 32k,128k --d 128,256 --heads 8/4,16/8,28/4 --budgets 0.1,0.3 --repeats 10)
if has pdl; then
    stamp "select without PDL, then with"
    for v in 0 1; do
        PYDHSA_CUDA_SELECT_PDL=$v timeout $(left) python3 bench/attention.py --device cuda --modes select --warm-cache \
            --n-kv 32k,128k --d 128 --heads 8/4,28/4 --budgets 0.3 --repeats 10 --out "$out/select-pdl$v.json" 2>&1 \
            | grep "attention: n_kv"
    done
fi
if has attention; then
    stamp "attention (cold)"
    timeout $(left) python3 bench/attention.py --device cuda --modes flash,dhsa-own,select "${grid[@]}" \
        --out "$out/attention-cuda.json" 2>&1 | grep "attention: n_kv"
fi
if has attention-warm; then
    stamp "attention (warm)"
    timeout $(left) python3 bench/attention.py --device cuda --warm-cache --modes flash,dhsa-own,select \
        --n-kv 32k,128k --d 128,256 --heads 8/4,16/8,28/4 --budgets 0.3 --repeats 10 \
        --out "$out/attention-cuda-warm.json" 2>&1 | grep "attention: n_kv"
fi
if has profile; then
    stamp profile
    timeout $(left) bash "$here/profile_select.sh" "$out" ${PROFILE_CONFIGS:-32k,128,8/4 32k,128,28/4 128k,256,16/8} > "$out/profile.log" 2>&1
    cat "$out/profile.log"; rm -f "$out"/ncu-*.csv "$out"/ncu-*.err
fi
stamp done
