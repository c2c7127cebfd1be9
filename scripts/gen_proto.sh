#!/usr/bin/env bash
# Regenerate the gRPC stubs in proto/ from proto/*.proto (grpcio-tools from .venv/).
#
#   bash scripts/gen_proto.sh
#
# Output is deterministic for a given grpcio-tools version; the generated files are
# committed. protoc emits `import worker_pb2 as ...` in *_pb2_grpc.py, which only works
# with proto/ on sys.path; we rewrite it to `from . import worker_pb2 as ...` because the
# stubs are imported as `splitserve.proto.*`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root/proto"
for src in *.proto; do
  stem="${src%.proto}"
  "$python" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "$src"
  sed -i.bak -E "s/^import ${stem}_pb2 as /from . import ${stem}_pb2 as /" "${stem}_pb2_grpc.py"
  rm -f "${stem}_pb2_grpc.py.bak"
done
echo "generated stubs in $root/proto with $("$python" -m grpc_tools.protoc --version)"
