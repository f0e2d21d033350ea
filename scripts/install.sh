#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Debian packages are installed as root, or through sudo when there is one.
as_root() {
  if [[ $EUID -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    echo "install.sh: $* needs root; run as root or with sudo" >&2
    exit 1
  fi
}

# The PostgreSQL server the tests start (tests/pgserver.py), from Debian, when none is installed.
# Its default cluster is neither created nor started: the tests run their own throwaway servers.
if ! compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; then
  as_root mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.d/50-pusa.conf >/dev/null
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql
fi

# The headless browser of tests/test_web.py: Debian's Chromium and its matching WebDriver (Selenium is
# given both paths, so nothing is downloaded at run time).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver
fi

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [[ ! -f $stamp ]]; then
  .venv/bin/pip install --quiet --upgrade pip
  # The CPU build of torch first: an unpinned resolve would pull a multi-GB CUDA build.
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[serve,test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
