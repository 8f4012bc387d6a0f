#!/usr/bin/env bash
# The engine under AddressSanitizer and UndefinedBehaviorSanitizer: the op and selection tests, a short
# end-to-end generation with DHSA, Ctrl-C during a prefill, and the threads tests.
#
#   tests/sanitize/run.sh [pytest args...]      (default: the files listed below)
#
# Builds this checkout with -DPYDHSA_SANITIZE=ON into build-asan/ (incremental; ccache when installed),
# installs its libraries into build-asan/prefix, and runs pytest with PYDHSA_LIB_DIR pointing there and the
# sanitizer runtimes preloaded into Python (and the CLI processes the tests start). Any report fails the run
# (halt_on_error; UBSan reports are errors too). Leak checking is off: the Python interpreter itself leaks by
# design at exit. Needs the checkout's package installed for its Python code (pip install -e ".[test]").
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -f build-asan/build.ninja ]; then
    cmake -S . -B build-asan -G Ninja -DPYDHSA_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
fi
ninja -C build-asan pydhsa
cmake --install build-asan --prefix build-asan/prefix >/dev/null
export PYDHSA_LIB_DIR=$PWD/build-asan/prefix/pydhsa/_lib
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
files=(tests/test_op_dhsa.py tests/test_select_c.py tests/test_generate.py tests/test_run_progress.py
       tests/test_concurrency.py tests/test_perplexity.py)
if [ $# -gt 0 ]; then files=("$@"); fi
python -m pytest -q -p no:cacheprovider "${files[@]}"
