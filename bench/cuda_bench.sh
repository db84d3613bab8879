#!/usr/bin/env bash
# The CUDA runs of BENCHMARKS.md on a lent GPU host, through bench/cuda_host.sh (run from a snapshot of the repo).
#
#   bash bench/cuda_bench.sh probe             # machine and software facts, no MLX needed
#   bash bench/cuda_bench.sh bench OUT_DIR     # learner (batch 16 and 64) and generation benchmarks
#   bash bench/cuda_bench.sh runtime OUT_DIR   # end-to-end scaling: 1 learner + 1/2/4 actors sharing the GPU
#   bash bench/cuda_bench.sh tests OUT_DIR     # the test suite on MLX-CUDA
#   bash bench/cuda_bench.sh warm OUT_DIR      # fill MLX's kernel cache: short runs of ours and mlx-lm-lora
#   bash bench/cuda_bench.sh e2e OUT_DIR       # issue 17 item 4: one GRPO step, ours (1, 2 actors) vs mlx-lm-lora
#   bash bench/cuda_bench.sh layouts OUT_DIR   # issue 17 item 3: 4 actors, one wide actor, one process
#   bash bench/cuda_bench.sh ours-e2e OUT_DIR  # ours alone at 2 and 1 actors (peers from an earlier call)
#   bash bench/cuda_bench.sh ours-warm OUT_DIR # only ours-e2e's kernel-cache warm-up, as a call of its own
#
# bench/runtime/tests are meant to run as CMD of `bench/cuda_host.sh run WHEEL_DIR MODEL_META_DIR`, which leaves
# the bfloat16 random-weight SmolLM2-135M in /tmp/smollm-bf16. Each step has its own time limit so that one
# stuck step leaves the others' results; every log goes to OUT_DIR. warm/e2e/layouts: see e2e_settings below.
set -uo pipefail
mode=${1:-} out=${2:-/tmp}
model=/tmp/smollm-bf16
export PYTHONUNBUFFERED=1
mkdir -p "$out"
step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    return "$rc"
}
e2e_settings() {  # warm/e2e/layouts; every value can be set from the environment (small ones for a CPU check)
    py=${PY:-python3}
    # label:model folder:ppo.micro_batch_size[:meta folder to make the random-weight model from, when missing]
    sizes=${E2E_SIZES:-"135m:/tmp/smollm-bf16:32 1.7b:/tmp/smol17-bf16:16:.devmodel17"}
    prompts=${E2E_PROMPTS:-16} group=${E2E_GROUP:-8} tokens=${E2E_TOKENS:-256} beta=${E2E_BETA:-0.04}
    updates=${E2E_UPDATES:-5} warmup=${E2E_WARMUP:-2} peer_steps=${PEER_STEPS:-2}
    layout_updates=${E2E_LAYOUT_UPDATES:-6} # even: the 2-step actor's batches feed updates in pairs
    limit_x=${LIMIT_X:-1} # multiplies every time limit
    peer_wheel=${PEER_WHEEL:-.whl/mlx_lm_lora-5.10.2-py3-none-any.whl} peer_site=${PEER_SITE:-/tmp/peersite}
    seqs=$((prompts * group))
    kernels=${MLX_PTX_CACHE_DIR:-$($py -c 'from common.machine_cache import kernel_cache_dir as k; print(k())')}
    export MLX_PTX_CACHE_DIR=$kernels # the launcher's default, set for every process here (the peer's too)
    shape=(--prompts "$prompts" --group "$group" --new-tokens "$tokens" --beta "$beta" --warmup "$warmup")
    peer_shape=(--task arithmetic --prompts-per-step "$prompts" --group-size "$group" --max-new-tokens "$tokens")
    peer_shape+=(--lora-rank 16 --lora-alpha 32 --beta "$beta" --learning-rate 1e-5)
}
limit() { echo $(($1 * limit_x)); }
warm_e2e() { # a cold kernel cache warmed by ours alone on the first of E2E_SIZES; marked done in the cache
    size_fields "${sizes%% *}"
    (label=warm-$label updates=2 && ours "$label-ours" 330 300 "1") && mkdir -p "$kernels" &&
        touch "$kernels/.e2e-warm"
}
size_fields() { # size_fields LABEL:MODEL:MICRO[:META]: sets label model micro, makes the model when missing
    IFS=: read -r label model micro meta <<<"$1"
    if [ ! -d "$model" ] && [ -n "${meta:-}" ]; then
        step "random-weights-$label" "$(limit 120)" "$py" bench/random_weights.py "$meta" "$model" bfloat16
    fi
}
peer_ready() { # mlx-lm-lora (pure Python; its GRPO path needs only what mlx-lm needs) in its own folder
    [ -d "$peer_site/mlx_lm_lora" ] || "$py" -m pip install -q --no-index --no-deps --no-compile \
        --target "$peer_site" "$peer_wheel"
    echo "mlx-lm-lora from $peer_site: $(ls -d "$peer_site"/mlx_lm_lora-*.dist-info)"
}
ours() { # ours NAME LIMIT RUN_LIMIT LAYOUT...: bench/e2e_step.py at the current size, JSON in OUT_DIR/NAME.json
    local name=$1 lim=$2 run=$3
    shift 3
    local layouts=()
    for l in "$@"; do layouts+=(--layout "$l"); done
    step "$name" "$(limit "$lim")" "$py" bench/e2e_step.py ours --model "$model" --label "$label" --micro "$micro" \
        "${shape[@]}" --updates "$updates" "${layouts[@]}" --run-timeout "$(limit "$run")" --output "$out/$name.json"
}
peer() { # peer NAME LIMIT [ARGS...]: mlx-lm-lora's GRPO steps at the current size, record in OUT_DIR/NAME/
    local name=$1 lim=$2
    shift 2
    step "$name" "$(limit "$lim")" env PYTHONPATH="$peer_site:${PYTHONPATH:-}" "$py" bench/peer_mlx_lm_lora.py \
        --model "$model" --label "$label" "${peer_shape[@]}" --steps "$peer_steps" "$@" --out-dir "$out/$name"
}
warm_up() { # once per kernel cache: a cold one costs a first update of 100-225 s (bench/results/h200-warmup.md)
    [ -e "$kernels/.e2e-warm" ] && return
    echo "== kernel cache $kernels is not warm yet: warming it (up to ~5 min)"
    peer_ready
    size_fields "${sizes%% *}"
    label=warm-$label
    updates=2 ours "$label-ours" 330 300 "1" &&
        peer "$label-mlx-lm-lora" 300 --max-new-tokens 16 --steps 1 &&
        mkdir -p "$kernels" && touch "$kernels/.e2e-warm"
}
table() { step e2e-table 60 "$py" bench/e2e_step.py table "$out" --output "$out/e2e-table.md"; }
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
warm)
    e2e_settings
    warm_up
    ;;
e2e) # estimated ~7 min on an H200 with a warm kernel cache (~5 min more to warm a cold one)
    e2e_settings
    peer_ready
    warm_up
    for size in $sizes; do
        size_fields "$size"
        ours "e2e-$label-ours" 300 140 "2x$seqs=2" "1x$seqs=1"
        peer "e2e-$label-mlx-lm-lora" 240
    done
    table
    ;;
layouts) # estimated ~5 min: 4 actors of half a step each, one actor of two steps (lag bound 4, so that it
    # generates while the learner trains), the one-process loop; 1 and 2 actors of one step each are e2e's rows
    e2e_settings
    warm_up
    for size in $sizes; do
        size_fields "$size"
        updates=$layout_updates ours "layouts-$label" 420 140 "4x$((seqs / 2))=4:sampling.batch_size=$((seqs / 2))" \
            "1x$((seqs * 2))=1:sampling.batch_size=$((seqs * 2));ppo.max_policy_lag=4" "sync=sync"
    done
    table
    ;;
ours-warm) # only ours-e2e's warm-up (the first of E2E_SIZES, 2 updates, one actor): a call of its own
    e2e_settings
    warm_e2e
    ;;
ours-e2e) # ours alone at E2E_SIZES (2 actors, then 1, one step a batch each); peers' records from an earlier call
    # are rendered beside these by `bench/e2e_step.py table`. A cold kernel cache is first warmed by ours alone.
    e2e_settings
    [ -e "$kernels/.e2e-warm" ] || warm_e2e
    for size in $sizes; do
        size_fields "$size"
        ours "e2e-$label-ours" 300 140 "2x$seqs=2" "1x$seqs=1"
    done
    ;;
tests)
    step h100-tests 270 python3 -m pytest -q tests -p no:cacheprovider -rfE --timeout 150 --durations=15 \
        --junitxml="$out/h100-tests.xml"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
