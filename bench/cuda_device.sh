#!/usr/bin/env bash
# Build, check and time the DHSA CUDA kernels on a GPU machine, in one command.
#
#   bench/cuda_device.sh [--arch 90] [--stages build,tests,attention,prefill] [--out DIR] [--quick]
#
# Stages (default: all, in this order):
#   build      pip-installs this checkout with CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=<arch>"
#              into a private target directory (no build isolation: the machine may be offline).
#   tests      tests/test_op_cuda.py (kernels vs the NumPy reference and the CPU op, n_kv up to 128K) and
#              tests/test_cuda_e2e.py (random-weight Gemma 2/3 with every layer on the GPU).
#   attention  bench/attention.py --device cuda over the issue's grid -> attention-cuda.json
#   prefill    bench/cuda_prefill.py (random Gemma3-1B-shaped model, 8K/16K/32K)  -> prefill-cuda.json
# Results, logs and the GPU's description go to --out (default $OUT when set, else bench/results/cuda).
#
# Offline machines: set PYDHSA_LLAMA_CPP_DIR to an unpacked upstream tree (python native/fetch_upstream.py
# --export DIR makes one) and put wheels of missing Python packages (cffi, pycparser, gguf) in .whl/.
# Needs nvcc, cmake, ninja and python3 with numpy, pytest, torch, transformers, sentencepiece, safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=90
stages=build,tests,attention,prefill
out=${OUT:-bench/results/cuda}
quick=0
while [ $# -gt 0 ]; do
    case $1 in
        --arch) arch=$2; shift 2 ;;
        --stages) stages=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        *) echo "usage: $0 [--arch 90] [--stages build,tests,attention,prefill] [--out DIR] [--quick]" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
has() { case ",$stages," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
stamp() { echo "== $(date +%T) $*"; }

site=${PYDHSA_SITE:-/tmp/pydhsa-cuda-site}
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,memory.total \
    --format=csv > "$out/gpu.csv" 2>&1 || true
cat "$out/gpu.csv"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi

if has build; then
    stamp "build for sm_$arch"
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$arch ${CMAKE_ARGS:-}" \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        python3 -m pip install --no-build-isolation --no-deps --no-cache-dir --upgrade --target "$site" . \
        > "$out/build.log" 2>&1 || { tail -60 "$out/build.log"; exit 1; }
    stamp "built in $(( $(date +%s) - start )) s"
fi
python3 -c "from pydhsa.op import gpu_count; n = gpu_count(); print('pydhsa sees', n, 'GPU(s)'); raise SystemExit(n == 0)"

if has tests; then
    stamp "tests"
    (cd /tmp && python3 -m pytest -q -rs -p no:cacheprovider "$OLDPWD/tests/test_op_cuda.py" \
        "$OLDPWD/tests/test_cuda_e2e.py" 2>&1) | tee "$out/tests.log" | tail -40
fi

if has attention; then
    stamp "attention op benchmark"
    if [ $quick = 1 ]; then grid=(--n-kv 8k,32k --d 128 --heads 8/4 --budgets 0.3 --repeats 10)
    else grid=(--n-kv 8k,32k,64k,128k --d 128,256 --heads 8/4,16/8 --budgets 0.1,0.3,0.5 --repeats 10); fi
    python3 bench/attention.py --device cuda "${grid[@]}" --out "$out/attention-cuda.json" 2> "$out/attention.log"
fi

if has prefill; then
    stamp "prefill benchmark"
    lengths=8k,16k,32k; [ $quick = 1 ] && lengths=8k
    python3 bench/cuda_prefill.py --lengths $lengths --budgets 0.3 --out "$out/prefill-cuda.json" 2> "$out/prefill.log" \
        || { tail -30 "$out/prefill.log"; exit 1; }
fi
stamp done
