#!/usr/bin/env bash
# The GPU check: one prepared run for a bare GPU machine (see benchmarks/README.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # where pip works: the packages the GPU image lacks, into .whl/
#   bash benchmarks/gpu_check.sh                  # on the GPU machine; results in $OUT (default ./gpu_check_out)
#
# Without a CUDA GPU it says so in one line and exits 3 before doing anything. Otherwise it installs the carried
# wheels (if .whl/ holds any) into a private folder, then runs, each under its own timeout (about 6 minutes in
# all): the GPU tests, and the steps of benchmarks/gpu_check.py (inference, precision, training, onnx, report).
# It writes gpu_check.json, gpu_check.md, gpu_check.log, gpu_tests.xml and steps.tsv under $OUT, and exits 0
# when every step succeeded, 1 otherwise.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
PYTHON=${PYTHON:-python3}
OUT=${OUT:-./gpu_check_out}
WHEELS=.whl
SITE=${TMPDIR:-/tmp}/cops-gpu-check-site
# What the GPU image lacks (datasets and its dill, multiprocess) or has too old (transformers): fetched at the
# versions installed where --fetch-wheels runs, so the GPU runs what the CPU tests ran.
CARRIED=(transformers datasets dill multiprocess)

if [[ ${1:-} == --fetch-wheels ]]; then
    pins=$("$PYTHON" -c 'import importlib.metadata as m, sys; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' \
        "${CARRIED[@]}") || exit 2
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086  # $pins is a list of requirement words
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" $pins
fi
if [[ $# -gt 0 ]]; then
    echo "gpu_check.sh: error: unknown argument '$1'; run it with no argument, or --fetch-wheels." >&2
    exit 2
fi

gpu=$("$PYTHON" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
print(torch.cuda.get_device_name(0))' 2>&1)
if [[ $? -ne 0 ]]; then
    echo "gpu_check.sh: no CUDA GPU visible (${gpu##*$'\n'}): nothing measured; run it on a GPU machine." >&2
    exit 3
fi

step() {  # step NAME TIMEOUT COMMAND...: run COMMAND under TIMEOUT seconds, append "NAME exit seconds timeout"
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (timeout ${limit} s)"
    timeout --kill-after=10 "$limit" "$@"
    status=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$limit" >>"$OUT/steps.tsv"
    return "$status"
}

run_all() {
    echo "gpu_check.sh: $gpu; results in $OUT"
    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl || return 4
        export PYTHONPATH=$SITE:$PYTHONPATH
    fi
    if ! "$PYTHON" -c 'import cops_hf, datasets, benchmarks.gpu_check'; then
        echo "gpu_check.sh: error: cops_hf does not import here (above); where pip works, run" \
            "'bash benchmarks/gpu_check.sh --fetch-wheels' and carry .whl/ along." >&2
        return 4
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
    : >"$OUT/steps.tsv"
    local failed=0
    step tests 60 "$PYTHON" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py \
        --junitxml="$OUT/gpu_tests.xml" || failed=1
    step inference 100 "$PYTHON" -m benchmarks.gpu_check inference --out "$OUT" || failed=1
    step precision 70 "$PYTHON" -m benchmarks.gpu_check precision --out "$OUT" || failed=1
    step training 60 "$PYTHON" -m benchmarks.gpu_check training --out "$OUT" || failed=1
    step onnx 55 "$PYTHON" -m benchmarks.gpu_check onnx --out "$OUT" || failed=1
    step report 15 "$PYTHON" -m benchmarks.gpu_check report --out "$OUT" || failed=1
    return "$failed"
}

mkdir -p "$OUT"
run_all 2>&1 | tee "$OUT/gpu_check.log"
