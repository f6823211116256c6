#!/usr/bin/env bash
# Every GPU check in one go, for a machine with a CUDA device (a lent one has minutes):
# the environment, the CUDA tests (tests/test_cuda.py) and the GPU benchmark (bench/gpu.py).
#
#   bench/gpu_check.sh OUT_DIR [SIZES]
#
# Needs a python (PYTHON, default python3) with CUDA torch and embedserve installed, run from
# the repository root. Each stage has its own time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds)
# so that one stage running long cannot take the others' results with it; the benchmark
# saves its results after every step, and the sizes run in the order given.
set -u
out=${1:?usage: bench/gpu_check.sh OUT_DIR [SIZES]}
sizes=${2:-0.6B,4B}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
    nvidia-smi
    "$python" -c 'import torch, transformers, grpc, google.protobuf as pb
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers",
      transformers.__version__, "grpcio", grpc.__version__, "protobuf", pb.__version__)'
    nproc
} >"$out/env.txt" 2>&1
tail -n 2 "$out/env.txt"

# GPU load once a second for the whole run, to read against the benchmark's log.
nvidia-smi dmon -s um -d 1 -o T >"$out/dmon.txt" 2>&1 &
dmon=$!

# Defaults sized for a 600 s call on an H200 (tenth session): the tests took 14 s before the
# CUDA-graph ones; one server variant of the benchmark took 295 s for both sizes, and each
# more adds about 200 s. The benchmark saves after every step, so a cut keeps the rest.
timeout "${TEST_TIMEOUT:-90}" "$python" -m pytest -q -m gpu tests/test_cuda.py \
    -p no:cacheprovider -ra 2>&1 | tee "$out/cuda-tests.log" | tail -n 15

work=$(mktemp -d)
# The shipped server, and the same with CUDA graphs (--cuda-graph-tokens, experimental).
variants=${VARIANTS:-shipped=;graphs=--cuda-graph-tokens 8192}
timeout "${BENCH_TIMEOUT:-470}" "$python" -m bench.gpu --quick --sizes "$sizes" --out "$work" \
    --variants "$variants" \
    2>&1 | grep --line-buffered -v -e "Loading weights" -e "Writing model" | tee "$out/bench.log"
kill "$dmon" 2>/dev/null
cp "$work/results.json" "$work/results.md" "$out/" 2>/dev/null
tar czf "$out/server-logs.tgz" -C "$work" logs 2>/dev/null
cat "$out/results.md" 2>/dev/null || echo "no benchmark results"
