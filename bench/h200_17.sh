#!/usr/bin/env bash
# Issue 17's GPU measurements on the lent H200, as CMD of `bench/cuda_host.sh run .whl .devmodel` (which leaves the
# random-weight bf16 SmolLM2-135M at /tmp/smollm-bf16):
#
#   bash bench/h200_17.sh learner-small OUT_DIR  # 135M learner: fixed vs memory-chosen micro-batches, chunked
#                                                # vocabulary pass, reference pass skipped at kl 0; part profile
#   bash bench/h200_17.sh learner-large OUT_DIR  # the same with the 1.7B shape (written to /tmp/smol17-bf16)
#   bash bench/h200_17.sh ptx OUT_DIR            # the kernel cache archived for a later machine
#   bash bench/h200_17.sh finish-a OUT_DIR       # after the compiled no-grad passes and the memory budget fix:
#                                                # 135M cold then warm cache, memory-chosen micro-batches (auto)
#   bash bench/h200_17.sh finish-b OUT_DIR       # 1.7B shape: auto, 1 x 64, chunks, kl 0; generation MBU
#   bash bench/h200_17.sh decode OUT_DIR         # where a decode step's time goes (bench/decode_profile.py),
#                                                # 1.7B shape and 135M; 135M generation at batch 32 again
#   bash bench/h200_17.sh decode2 OUT_DIR        # the 1.7B step at batch 256 with the cache write, the mask and
#                                                # the attention kernel swapped in turn; then ours-e2e at 1.7B
#   bash bench/h200_17.sh decode3 OUT_DIR        # the decode step with its scatter write against slice_update,
#                                                # 1.7B at 32/128/256 rows; generation MBU; ours-e2e at 1.7B
#                                                # (at 575187b this mode timed a one-step-at-a-time order, since
#                                                # removed: it was no faster)
#
# Every process logs to OUT_DIR/NAME.log; `first_update.py` rows are the `ROW {json}` lines, collected into
# OUT_DIR/learner17.jsonl. The kernel cache (MLX_PTX_CACHE_DIR) is one folder for the whole call, so only the
# first process of a shape compiles; it is archived to OUT_DIR/ptx-cache.tar.xz for a later machine.
set -uo pipefail
mode=$1 out=${2:-/tmp}
small=${SMALL:-/tmp/smollm-bf16} large=${LARGE:-/tmp/smol17-bf16}
export PYTHONUNBUFFERED=1 MLX_PTX_CACHE_DIR=${MLX_PTX_CACHE_DIR:-/root/.cache/mlx-ppo/kernels/mlx-0.32.4}
mkdir -p "$MLX_PTX_CACHE_DIR"
step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    grep '^ROW ' "$out/$name.log" | sed 's/^ROW //' >>"$out/learner17.jsonl"
    tail -n 12 "$out/$name.log" | grep -v '^ROW ' | cut -c1-240
}
first() {  # first NAME MODEL MICRO [nokl] [chunk=N]: 64 x (128 + 384), LoRA r16, 3 timed updates after the first
    local name=$1 model=$2 micro=$3
    shift 3
    step "$name" "${FIRST_LIMIT:-150}" python3 bench/first_update.py "$model" 64 128 384 "$micro" 16 3 "$@"
}
large_model() { [ -d $large ] || python3 bench/random_weights.py .devmodel17 $large bfloat16; }
e2e_large() {  # ours-e2e (2 actors, then 1) on the 1.7B shape, its log in OUT_DIR/e2e.txt
    E2E_SIZES="1.7b:$large:16:.devmodel17" E2E_TOKENS=128 E2E_UPDATES=4 bash bench/cuda_bench.sh ours-e2e "$out" \
        >"$out/e2e.txt" 2>&1
    tail -n 5 "$out/e2e.txt"
}
case $mode in
learner-small)
    first s-m16 $small 16
    first s-auto $small auto
    first s-auto-chunk $small auto chunk=2048
    step s-profile 120 python3 bench/learner_profile.py --model $small --micro 16 --output "$out/profile-135m.json"
    ;;
learner-large)
    large_model
    first l-m16 $large 16
    first l-auto $large auto
    first l-auto-chunk $large auto chunk=2048
    first l-auto-nokl $large auto nokl
    step l-profile 150 python3 bench/learner_profile.py --model $large --micro 16 --output "$out/profile-1.7b.json"
    ;;
trl)  # TRL GRPOTrainer + peft on the host's own PyTorch (carry .whltrl); TRL_TOKENS new tokens, TRL_BETA
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/trlsite .whltrl/*.whl
    python3 -c "import pyarrow, fsspec, peft, torch; print(pyarrow.__version__, fsspec.__version__, peft.__version__, torch.__version__)"
    large_model
    for pair in 135m:$small 1.7b:$large; do
        step trl-${pair%%:*} 240 env PYTHONPATH=/tmp/trlsite:$PWD python3 bench/peer_trl.py --model ${pair#*:} \
            --steps ${TRL_STEPS:-3} --max-new-tokens ${TRL_TOKENS:-128} --beta ${TRL_BETA:-0.04} \
            --label ${pair%%:*} --output "$out/trl-${pair%%:*}.json"
    done
    ;;
finish-a)
    FIRST_LIMIT=300 first s-auto-cold $small auto   # the first process here: the kernel cache starts empty
    first s-auto $small auto        # the same shapes with the cache the first filled: the warm first update
    first s-auto-nokl $small auto nokl
    large_model
    ;;
finish-b)
    large_model
    first l-auto $large auto
    first l-m64 $large 64
    first l-auto-chunk $large auto chunk=2048
    first l-auto-nokl $large auto nokl
    step gen-1.7b 240 python3 bench/generation.py --model $large --batch-sizes 32,128,256 --new-tokens 128 \
        --mixed-lengths --samplers ours-compiled,mlx_lm --skip-stock --repeats 2 --output "$out/h200-generation-1.7b.json"
    ;;
decode)
    large_model
    step decode-1.7b 240 python3 bench/decode_profile.py --model $large --batch-sizes 32,256 --context 128,384 \
        --output "$out/decode-1.7b.json"
    step decode-135m 90 python3 bench/decode_profile.py --model $small --batch-sizes 32,256 --context 128,384 \
        --output "$out/decode-135m.json"
    step gen-135m 120 python3 bench/generation.py --model $small --batch-sizes 32 --new-tokens 128 \
        --mixed-lengths --samplers ours-compiled,mlx_lm --skip-stock --repeats 3 --output "$out/h200-generation-135m.json"
    ;;
decode2)
    large_model
    step decode2-1.7b 200 python3 bench/decode_profile.py --model $large --batch-sizes 256 --context 128,384 \
        --variants full,no-write,no-mask,additive-mask,matmul-attention --output "$out/decode2-1.7b.json"
    e2e_large
    ;;
decode3)
    large_model
    step decode3-1.7b 150 python3 bench/decode_profile.py --model $large --batch-sizes 32,128,256 --context 128 \
        --variants full,slice-update,no-write --timings host-paced --output "$out/decode3-1.7b.json"
    step gen3-1.7b 240 python3 bench/generation.py --model $large --batch-sizes 32,128,256 --new-tokens 128 \
        --mixed-lengths --samplers ours-compiled,mlx_lm --skip-stock --repeats 2 \
        --output "$out/h200-generation-1.7b.json"
    e2e_large
    ;;
ptx)
    tar -C "$MLX_PTX_CACHE_DIR" -cf - . | xz -T0 -6 >"$out/ptx-cache.tar.xz"
    ls -l "$out"
    ;;
*)
    sed -n '2,10p' "$0"
    exit 2
    ;;
esac
