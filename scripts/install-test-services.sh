#!/usr/bin/env bash
# Installs the external services the live tests start themselves, if missing:
#   etcd  (Debian's etcd-server, etcd 3.4)  — discovery tests start it on a free loopback port.
# Idempotent and quiet; does nothing when `etcd` is already on PATH. Needs root (or sudo) and
# apt; when neither is available it says so and exits 0, and the tests that need etcd skip.
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "[install-test-services] etcd not found and apt-get is unavailable; etcd tests will skip" >&2
  exit 0
fi

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo_cmd=(sudo -n)
  else
    echo "[install-test-services] etcd not found and not root; etcd tests will skip" >&2
    exit 0
  fi
fi

echo "[install-test-services] installing etcd-server (Debian)" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq >/dev/null
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
# The package enables a system etcd service on :2379; tests never use it (they start their own
# on free ports), and in containers without systemd it does not run anyway.
command -v etcd >/dev/null 2>&1 || { echo "[install-test-services] etcd still missing" >&2; exit 1; }
