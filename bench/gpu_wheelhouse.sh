#!/usr/bin/env bash
# Wheels for running the GPU checks on a machine without network access whose image already
# has CUDA torch, transformers, tokenizers, numpy, pytest and psutil (a typical CUDA image):
# embedserve itself and the server's other dependencies, at the versions of this checkout's
# .venv, plus py-spy for bench.gpu_probe.
#
#   bench/gpu_wheelhouse.sh DIR [PYTHON_VERSION]      # here, with network (default 3.12)
#   pip install --no-index --no-deps --target /tmp/site DIR/*.whl    # there
#   PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH bench/gpu_check.sh OUT_DIR
set -eu
dir=${1:?usage: bench/gpu_wheelhouse.sh DIR [PYTHON_VERSION]}
python_version=${2:-3.12}
venv=${VENV:-.venv}
mkdir -p "$dir"

# The installed version of each package (pip freeze spells some with '_', some with '-').
pinned() {
    local names
    names=$(IFS='|'; echo "$*" | sed 's/-/[-_]/g')
    "$venv/bin/pip" freeze 2>/dev/null | grep -i -E "^($names)==" || true
}
packages=(
    grpcio grpcio-status grpcio-health-checking grpcio-reflection protobuf
    googleapis-common-protos opentelemetry-api opentelemetry-sdk
    opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http
    opentelemetry-exporter-otlp-proto-common opentelemetry-proto
    opentelemetry-semantic-conventions opentelemetry-exporter-otlp-common
    opentelemetry-exporter-http-transport redis prometheus-client py-spy
)
mapfile -t pins < <(pinned "${packages[@]}")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python_version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dir" "${pins[@]}"
"$venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$dir" .
ls "$dir"
