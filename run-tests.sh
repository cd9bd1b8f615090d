#!/usr/bin/env bash
# Install what the tests need, from nothing, then run the whole test suite.
#
#   ./run-tests.sh                 # everything (about 15 minutes on 2 CPU cores)
#   ./run-tests.sh -m "not slow"   # skip the few slow tests (real photos, Docker build); extra args go to pytest
#
# System packages (Debian/Ubuntu, needs root or sudo, installed only when missing): graphviz for model
# diagrams, chromium for the TensorBoard browser check, docker.io and debootstrap for the Docker test,
# fonts-noto-cjk so figures draw Japanese, Chinese and Korean labels.
set -euo pipefail
cd "$(dirname "$0")"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v dot >/dev/null || missing+=(graphviz)
command -v chromium >/dev/null || missing+=(chromium)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
ls /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc >/dev/null 2>&1 || missing+=(fonts-noto-cjk)
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing system packages: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

python=$(command -v python3.11 || command -v python3)
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt -e .

exec .venv/bin/python -m pytest "$@"
