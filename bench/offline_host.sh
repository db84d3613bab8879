#!/usr/bin/env bash
# Run a benchmark on an offline Linux x86_64 host (no package index reachable) from carried files.
#
#   bash bench/offline_host.sh WHEEL_DIR MODEL_META_DIR CMD ARGS...
#
# WHEEL_DIR: cp312 wheels of mlx, mlx-cpu, mlx-lm, pyzmq and Debian's libopenblas0-pthread + libgfortran5 .debs
# (see BENCHMARKS.md for the download commands). MODEL_META_DIR: a converted model folder's config.json and
# tokenizer files; the model gets random weights of the same shapes in /tmp/smollm-random (bench/random_weights.py).
set -euo pipefail
wheels=$1 meta=$2
shift 2
site=/tmp/offline-site deb=/tmp/offline-deb
python3 -m pip install -q --no-deps --target "$site" "$wheels"/*.whl
for f in "$wheels"/*.deb; do dpkg -x "$f" "$deb"; done
lib=$deb/usr/lib/x86_64-linux-gnu
export PYTHONPATH=$site:$PWD LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-}
export LD_PRELOAD=$lib/openblas-pthread/libopenblas.so.0
export OPENBLAS_CORETYPE=${OPENBLAS_CORETYPE:-SkylakeX}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824  # as common/blas.py sets them
[ -d /tmp/smollm-random ] || python3 bench/random_weights.py "$meta" /tmp/smollm-random
"$@"
