#!/usr/bin/env bash
# Regenerate kv_transfer_pb2.py / kv_transfer_pb2_grpc.py / kv_transfer_pb2.pyi from kv_transfer.proto.
# Needs grpcio-tools matching the pinned grpcio (1.84): `pip install grpcio-tools==1.84.*`.
# The outputs get a `# ruff: noqa` first line, so `ruff check` passes without an exclude pattern.
set -euo pipefail
cd "$(dirname "$0")/../.."  # repo root, so the generated import is `from cluster.transport import ...`
python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
  cluster/transport/kv_transfer.proto
# The generated *_pb2_grpc.py refuses grpcio older than the grpcio-tools that wrote it; the code only uses
# APIs present since grpcio 1.84.0 (the GPU image ships 1.84.0), so accept any 1.84.x, as proto/gen.sh does.
sed -i -E "s/^GRPC_GENERATED_VERSION = '[0-9.]+'/GRPC_GENERATED_VERSION = '1.84.0'/" \
  cluster/transport/kv_transfer_pb2_grpc.py
for f in cluster/transport/kv_transfer_pb2.py cluster/transport/kv_transfer_pb2_grpc.py \
         cluster/transport/kv_transfer_pb2.pyi; do
  { echo "# ruff: noqa"; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
