#!/usr/bin/env bash
# Regenerate the gRPC stubs in proto/ from proto/*.proto (grpcio-tools from .venv/).
#
#   bash scripts/gen_proto.sh                  # every proto/*.proto (worker, router)
#   bash scripts/gen_proto.sh router.proto     # only the ones named
#
# Output is deterministic for a given grpcio-tools version; the generated files are
# committed. protoc emits `import <stem>_pb2 as ...` in *_pb2_grpc.py, which only works
# with proto/ on sys.path; we rewrite it to `from . import <stem>_pb2 as ...` because the
# stubs are imported as `splitserve.proto.*`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root/proto"
if [ "$#" -gt 0 ]; then srcs=("$@"); else srcs=(*.proto); fi
for src in "${srcs[@]}"; do
  src="$(basename "$src")"
  stem="${src%.proto}"
  "$python" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "$src"
  sed -i.bak -E "s/^import ${stem}_pb2 as /from . import ${stem}_pb2 as /" "${stem}_pb2_grpc.py"
  rm -f "${stem}_pb2_grpc.py.bak"
done
echo "generated stubs in $root/proto with $("$python" -m grpc_tools.protoc --version)"
