#!/usr/bin/env bash
# Regenerate the Python code for proto/pdserve/v1/*.proto (needs grpcio-tools; run from anywhere).
# Imports come out as `from pdserve.v1 import ...`, matching the installed package layout.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. pdserve/v1/*.proto
# The generated *_pb2_grpc.py refuse grpcio older than the grpcio-tools that wrote them; the code only
# uses APIs present since grpcio 1.84.0, so accept any 1.84.x (the GPU image ships 1.84.0).
sed -i -E "s/^GRPC_GENERATED_VERSION = '[0-9.]+'/GRPC_GENERATED_VERSION = '1.84.0'/" pdserve/v1/*_pb2_grpc.py
# The .pyi stubs are generated too (for editors and mypy); keep ruff off them (pyproject excludes *_pb2*.py).
for f in pdserve/v1/*_pb2*.pyi; do sed -i '1i # ruff: noqa' "$f"; done
touch pdserve/v1/__init__.py
echo "generated: $(ls pdserve/v1/*_pb2*.py* | tr '\n' ' ')"
