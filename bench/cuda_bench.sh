#!/usr/bin/env bash
# The CUDA runs of BENCHMARKS.md on a lent GPU host, through bench/cuda_host.sh (run from a snapshot of the repo).
#
#   bash bench/cuda_bench.sh probe             # machine and software facts, no MLX needed
#   bash bench/cuda_bench.sh bench OUT_DIR     # learner (batch 16 and 64) and generation benchmarks
#   bash bench/cuda_bench.sh runtime OUT_DIR   # end-to-end scaling: 1 learner + 1/2/4 actors sharing the GPU
#   bash bench/cuda_bench.sh tests OUT_DIR     # the test suite on MLX-CUDA
#
# bench/runtime/tests are meant to run as CMD of `bench/cuda_host.sh run WHEEL_DIR MODEL_META_DIR`, which leaves
# the bfloat16 random-weight SmolLM2-135M in /tmp/smollm-bf16. Each step has its own time limit so that one
# stuck step leaves the others' results; every log goes to OUT_DIR.
set -uo pipefail
mode=$1 out=${2:-/tmp}
model=/tmp/smollm-bf16
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}
case $mode in
probe)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    echo "cores $(nproc); $(grep -m1 'model name' /proc/cpuinfo)"
    python3 -V
    command -v python3 nvcc
    ls -d /usr/local/cuda 2>&1
    python3 -c 'import nvidia; print(nvidia.__path__)'
    python3 -m pip list 2>/dev/null | grep -iE '^(msgpack|psutil|pytest|pytest-timeout|hypothesis|numpy|transformers|jinja2|pyyaml|protobuf|sentencepiece|safetensors|tokenizers) '
    ls /usr/lib/x86_64-linux-gnu | grep -iE 'openblas|libblas' || echo "no system BLAS"
    ;;
bench)
    step h100-learner-b16 170 python3 bench/learner.py --model "$model" --repeats 3 --output "$out/h100-learner-b16.json"
    step h100-learner-b64 170 python3 bench/learner.py --model "$model" --repeats 3 --batch 64 --micro 16 \
        --output "$out/h100-learner-b64.json"
    step h100-generation 170 python3 bench/generation.py --model "$model" --batch-sizes 32,128,256 --skip-stock \
        --repeats 2 --output "$out/h100-generation.json"
    ;;
runtime)
    step h100-runtime 290 python3 bench/runtime.py scaling --actors 1,2,4 --updates 8 --model "$model" \
        --output "$out/h100-runtime.json"
    ;;
tests)
    step h100-tests 270 python3 -m pytest -q tests -p no:cacheprovider -rfE --timeout 150 --durations=15 \
        --junitxml="$out/h100-tests.xml"
    ;;
*)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
