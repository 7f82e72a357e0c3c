#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh Debian 12 machine, as root:
# the apt packages the supervisor and the C sample need, and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  libseccomp2 libcap-dev build-essential pkg-config python3-venv python3-dev
  clang lld wasi-libc libclang-rt-14-dev-wasm32
  bubblewrap util-linux iproute2
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing apt packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
stamp=.venv/.forgeone-setup
if [[ ! -x .venv/bin/python || ! -f $stamp || pyproject.toml -nt $stamp
      || setup.py -nt $stamp || forgeone_isolate/_sys/_keeper.c -nt $stamp ]]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi
