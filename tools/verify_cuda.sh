#!/usr/bin/env bash
# Verify kmax_m2f's CUDA kernel on a machine with an NVIDIA GPU, in one go:
#   1. build kmax_m2f._C in place with the CUDA kernel (FORCE_CUDA=1);
#   2. the op's tests, the CUDA ones included (CUDA against the CPU kernel, half precision, layer);
#   3. compute-sanitizer memcheck and racecheck over those CUDA tests (skipped if not installed);
#   4. the op and whole-model timings of tools/benchmark.py on the GPU.
# Logs and tables go to $VERIFY_CUDA_OUT (default output/verify_cuda). Usage, from the repository root:
#   bash tools/verify_cuda.sh            # PYTHON=python3.12 to pick the interpreter
set -euo pipefail

PYTHON=${PYTHON:-python3}
OUT_DIR=${VERIFY_CUDA_OUT:-output/verify_cuda}
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "verify_cuda.sh: torch sees no CUDA GPU here; run it on a machine with one" >&2
    exit 2
fi

echo "== build (log: $OUT_DIR/build.log)"
if ! FORCE_CUDA=1 "$PYTHON" setup.py build_ext --inplace >"$OUT_DIR/build.log" 2>&1; then
    tail -30 "$OUT_DIR/build.log" >&2
    exit 1
fi
"$PYTHON" -c "import kmax_m2f._C as C; assert C.has_cuda(), 'kmax_m2f._C was built without CUDA'"

echo "== tests/test_ms_deform_attn.py"
"$PYTHON" -m pytest tests/test_ms_deform_attn.py -q -p no:cacheprovider 2>&1 | tee "$OUT_DIR/pytest.log" | tail -3

if command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        compute-sanitizer --tool "$tool" --error-exitcode 1 \
            "$PYTHON" -m pytest tests/test_ms_deform_attn.py -q -p no:cacheprovider -k cuda \
            >"$OUT_DIR/sanitizer_$tool.log" 2>&1 || { tail -20 "$OUT_DIR/sanitizer_$tool.log" >&2; exit 1; }
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitizer_$tool.log" | tail -1
    done
else
    echo "== compute-sanitizer not found: memcheck / racecheck skipped"
fi

echo "== benchmarks"
"$PYTHON" tools/benchmark.py ms_deform_attn --device cuda --repeats 30 --warmup 5 2>/dev/null | tee "$OUT_DIR/ms_deform_attn.md"
"$PYTHON" tools/benchmark.py mask2former --device cuda --repeats 10 --warmup 3 2>/dev/null | tee "$OUT_DIR/mask2former.md"
"$PYTHON" tools/benchmark.py kmax --device cuda --repeats 10 --warmup 3 2>/dev/null | tee "$OUT_DIR/kmax.md"
