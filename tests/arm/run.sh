#!/usr/bin/env bash
# The CPU kernels on 64-bit ARM (NEON), run under qemu-user against the NumPy reference.
#
#   tests/arm/run.sh [pytest args...]
#
# Cross-builds the engine (libpydhsa, libllama, ggml) for aarch64 with Debian's cross compilers into
# build-arm/ (incremental; ccache when installed), builds tests/arm/op_driver.c against it, and runs
# tests/test_arm_qemu.py, which writes each case's inputs, runs the driver under qemu-aarch64 and checks
# its ranges and outputs against pydhsa.reference on the x86 side. Needs (Debian): g++-aarch64-linux-gnu
# gcc-aarch64-linux-gnu qemu-user, and this checkout's x86 package installed (pip install -e ".[test]").
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ qemu-aarch64; do
    command -v $tool >/dev/null || { echo "tests/arm/run.sh: $tool not found (apt install g++-aarch64-linux-gnu gcc-aarch64-linux-gnu qemu-user)" >&2; exit 2; }
done
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
if [ ! -f build-arm/build.ninja ]; then
    cmake -S . -B build-arm -G Ninja -DCMAKE_TOOLCHAIN_FILE=tests/arm/aarch64-linux-gnu.cmake \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF "${launcher[@]}"
fi
ninja -C build-arm pydhsa
lib=$(dirname "$(find build-arm -name 'libpydhsa.so' | head -1)")
rpath_link=$(find build-arm -name '*.so' -printf '-Wl,-rpath-link,%h\n' | sort -u)
# shellcheck disable=SC2086  # one flag per library folder
aarch64-linux-gnu-gcc -O2 -std=c11 -Wall -Wextra -I native/capi tests/arm/op_driver.c -o build-arm/op_driver \
    -L"$lib" -lpydhsa $rpath_link
export PYDHSA_ARM_BUILD=$PWD/build-arm
python -m pytest -q tests/test_arm_qemu.py "$@"
