#!/usr/bin/env bash
# Build, check and time the DHSA CUDA kernels on a GPU machine, in one command.
#
#   bench/cuda_device.sh [--arch 90] [--stages build,tests,attention,prefill,prefill-qwen,attention-warm]
#                        [--out DIR] [--quick | --short]
#
# Stages (default: all, in this order; a failing stage is reported and the next ones still run):
#   build      pip-installs this checkout with CMAKE_ARGS="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=<arch>"
#              into a private target directory (no build isolation: the machine may be offline).
#   tests      tests/test_op_cuda.py (kernels vs the NumPy reference and the CPU op, n_kv up to 128K),
#              tests/test_op_backends.py (every backend of the build vs the CPU backend) and
#              tests/test_cuda_e2e.py (random-weight Gemma 2/3 with every layer on the GPU).
#   attention  bench/attention.py --device cuda over the issue's grid: dense, DHSA through our kernel and
#              through upstream's sparse flash attention, the selection alone -> attention-cuda.json
#   prefill    bench/cuda_prefill.py (random Gemma3-1B-shaped model, 8K/16K/32K, both CUDA attention routes)
#              -> prefill-cuda.json
#   prefill-qwen  the same for a random Qwen2-7B-shaped model (every layer global), 8K and 32K (its maximum
#              context) -> prefill-cuda-qwen.json
#   attention-warm  the same with the selection caches kept between repeats -> attention-cuda-warm.json
# --quick: a small grid for a smoke test; --short: budgets 0.1/0.3 only and 2 prefill rounds (one call of the
# device tool on our lent machines is limited to 10 minutes, the build included).
# Results, logs and the GPU's description go to --out (default $OUT when set, else bench/results/cuda).
#
# Offline machines: set PYDHSA_LLAMA_CPP_DIR to an unpacked upstream tree (python native/fetch_upstream.py
# --export DIR makes one) and put wheels of missing Python packages (cffi, pycparser, gguf) in .whl/.
# Needs nvcc, cmake, ninja and python3 with numpy, pytest, torch, transformers, sentencepiece, safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."

arch=90
stages=build,tests,attention,prefill,prefill-qwen,attention-warm
out=${OUT:-bench/results/cuda}
quick=0
short=0
failed=""
while [ $# -gt 0 ]; do
    case $1 in
        --arch) arch=$2; shift 2 ;;
        --stages) stages=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --quick) quick=1; shift ;;
        --short) short=1; shift ;;
        *) echo "usage: $0 [--arch 90] [--stages build,tests,attention,prefill,prefill-qwen,attention-warm] [--out DIR] [--quick|--short]" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
has() { case ",$stages," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
stamp() { echo "== $(date +%T) $*"; }

# Inside the checkout (git-ignored), so that a warm machine keeps the install and the build folder between calls.
site=${PYDHSA_SITE:-$PWD/.device/site}
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A machine's default compiler can be a separate toolchain whose C++ runtime differs from the one Python
# loads (seen on the lent GPU machines: CXX=/opt/gcc/bin/g++, and the engine crashed in
# llama_model::print_info); build with the system compiler unless PYDHSA_KEEP_CXX is set.
if [ -z "${PYDHSA_KEEP_CXX:-}" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++
fi

# (the benchmark JSON files record the same, per run)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,memory.total \
    --format=csv 2>&1 || true

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

# Each test file in its own process: a crash in one still leaves the other's results. --capture=sys: what the
# engine writes to stderr (an abort's message) reaches the log even when the process dies.
if has tests; then
    for t in test_op_cuda test_op_backends test_cuda_e2e; do
        stamp "tests/$t.py"
        (cd /tmp && python3 -m pytest -q -rs --capture=sys -p no:cacheprovider "$OLDPWD/tests/$t.py" 2>&1) > "$out/$t.log" \
            || failed="$failed $t"
        tail -15 "$out/$t.log"
    done
fi

budgets=0.1,0.3,0.5; [ $short = 1 ] && budgets=0.1,0.3
if [ $quick = 1 ]; then grid=(--n-kv 8k,32k --d 128 --heads 8/4 --budgets 0.3 --repeats 10)
elif [ $short = 1 ]; then grid=(--n-kv 32k,64k,128k --d 128,256 --heads 8/4,16/8,28/4 --budgets $budgets --repeats 10)
else grid=(--n-kv 8k,32k,64k,128k --d 128,256 --heads 8/4,16/8,28/4 --budgets $budgets --repeats 10); fi
if has attention; then
    stamp "attention op benchmark (cold selection caches)"
    python3 bench/attention.py --device cuda "${grid[@]}" --out "$out/attention-cuda.json" 2> "$out/attention.log" \
        || failed="$failed attention"
fi

repeats=3; [ $short = 1 ] && repeats=2
if has prefill; then
    stamp "prefill benchmark (Gemma3-1B-shaped)"
    lengths=8k,16k,32k; [ $quick = 1 ] && lengths=8k
    python3 bench/cuda_prefill.py --lengths $lengths --budgets 0.3 --cuda-attn own,fattn --repeats $repeats \
        --out "$out/prefill-cuda.json" 2> "$out/prefill.log" || { tail -30 "$out/prefill.log"; failed="$failed prefill"; }
fi
if has prefill-qwen; then
    stamp "prefill benchmark (Qwen2-7B-shaped)"
    lengths=8k,32k; [ $quick = 1 ] && lengths=8k
    python3 bench/cuda_prefill.py --shape qwen2-7b --lengths $lengths --budgets 0.3 --cuda-attn own,fattn \
        --repeats $repeats --out "$out/prefill-cuda-qwen.json" 2> "$out/prefill-qwen.log" \
        || { tail -30 "$out/prefill-qwen.log"; failed="$failed prefill-qwen"; }
fi
if has attention-warm; then
    stamp "attention op benchmark (warm selection caches)"
    python3 bench/attention.py --device cuda --warm-cache --modes flash,dhsa-own,dhsa-fattn,select --n-kv 32k,128k --d 128,256 \
        --heads 8/4,16/8 --budgets 0.3 --repeats 10 --out "$out/attention-cuda-warm.json" 2>> "$out/attention.log" \
        || failed="$failed attention-warm"
fi
stamp "done${failed:+; FAILED:$failed}"
[ -z "$failed" ]
