#!/usr/bin/env bash
# Run a command with MLX's CUDA backend (mlx-cuda-13) on an offline Linux x86_64 + NVIDIA host from carried files.
#
#   bash bench/cuda_host.sh pack CUDA_WHEEL PART_DIR...       # here: split the wheel into one part per PART_DIR
#   bash bench/cuda_host.sh stash PART_DIR                    # there, call 1: keep the carried part out of the repo
#   bash bench/cuda_host.sh run WHEEL_DIR MODEL_META_DIR CMD...   # there, a later call: set up once, run CMD
#
# Why parts: the mlx-cuda-13 wheel is 86 MB (a 139 MB libmlx.so with kernels for every GPU generation), over the
# device tool's 64 MiB carry per call. `pack` unzips it, re-packs it with `tar cJ` (~75 MB) and splits that into
# as many parts as PART_DIRs are given (e.g. .cudapart1 .cudapart2, ignored folders); each part travels in its own
# call and `stash` copies it to $CUDA_PARTS (/root/cudapart), which lives as long as the warm machine (~30 s
# idle between calls). `run` then checks the assembled archive against the checksum `pack` wrote, builds
# $CUDA_SITE (/root/cudasite) once and reuses it on later calls to the same machine:
#   - the carried cp312 wheels of WHEEL_DIR (mlx, mlx-lm, pyzmq, and any other small ones), never mlx-cpu:
#     with mlx-cpu's libmlx beside it MLX would run on the CPU;
#   - the mlx-cuda-13 files (mlx/lib/libmlx.so, headers NVRTC compiles kernels against, mlx_cuda_13.libs);
#   - $CUDA_SITE/nvidia -> the `nvidia` package folder of the host's own Python: libmlx.so's RPATH is
#     $ORIGIN/../../nvidia/{cu13,cublas,cuda_nvrtc,cudnn,cufft,cusolver,nccl}/lib, and the image's PyTorch
#     already ships those CUDA 13 libraries.
# Then it checks that MLX's default device is the GPU, writes a random-weight bfloat16 model of MODEL_META_DIR's
# shapes to /tmp/smollm-bf16 (bench/random_weights.py; bfloat16 is SmolLM2's checkpoint dtype, which
# model.dtype = "auto" keeps off the CPU) and runs CMD with PYTHONPATH=$CUDA_SITE:$PWD.
set -euo pipefail
parts=${CUDA_PARTS:-/root/cudapart} site=${CUDA_SITE:-/root/cudasite}
archive=cuda.tar.xz

case ${1:-} in
pack)
    wheel=$(realpath "$2")
    shift 2
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && python3 -m zipfile -e "$wheel" unz && tar -C unz -cf - . | xz -T0 -9 >"$archive")
    size=$(stat -c %s "$work/$archive")
    n=$#
    (cd "$work" && split -n "$n" -d "$archive" "$archive.part-" && sha256sum "$archive" >"$archive.sha256")
    i=0
    for dir in "$@"; do
        mkdir -p "$dir"
        cp "$work/$archive.part-$(printf %02d $i)" "$work/$archive.sha256" "$dir/"
        i=$((i + 1))
    done
    echo "packed $wheel into $n parts of $((size / n / 1000000)) MB"
    ;;
stash)
    mkdir -p "$parts"
    cp "$2"/"$archive".* "$parts/"
    ls -l "$parts"
    ;;
run)
    wheels=$2 meta=$3
    shift 3
    if [ ! -e "$site/.done" ]; then
        (cd "$parts" && cat "$archive".part-* >"$archive" && sha256sum -c "$archive.sha256")
        rm -rf "$site" && mkdir -p "$site"
        mapfile -t whl < <(ls "$wheels"/*.whl | grep -v '/mlx_cpu-')
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${whl[@]}"
        xz -d -T0 <"$parts/$archive" | tar -C "$site" -xf -
        rm -f "$parts/$archive"
        nvidia=$(cd / && python3 -c 'import nvidia; print(next(p for p in nvidia.__path__ if "site-packages" in p))')
        ln -sfn "$nvidia" "$site/nvidia"
        ldd "$site/mlx/lib/libmlx.so" | grep 'not found' || echo "libmlx.so: every library found"
        touch "$site/.done"
    fi
    export PYTHONPATH=$site:$PWD
    # NVRTC (MLX's run-time kernel compiler) includes $CUDA_HOME/include; default /usr/local/cuda, else nvcc's.
    if [ -z "${CUDA_HOME:-}" ] && [ ! -d /usr/local/cuda ] && command -v nvcc >/dev/null; then
        CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")")
        export CUDA_HOME
    fi
    python3 -c 'import mlx.core as mx, sys; d = mx.default_device(); print("MLX", mx.__version__, d, mx.device_info()); sys.exit(d != mx.gpu)'
    [ -d /tmp/smollm-bf16 ] || python3 bench/random_weights.py "$meta" /tmp/smollm-bf16 bfloat16
    "$@"
    ;;
*)
    sed -n '2,20p' "$0"
    exit 2
    ;;
esac
