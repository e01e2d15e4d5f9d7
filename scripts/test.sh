#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian 12 machine, then run it all:
# lint, unit, integration and the end-to-end tests in a booted systemd (those need root).
# Extra arguments go to pytest. CI runs this very script (see .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # systemd-python builds against libsystemd; zsh runs the packaged zsh completion;
    # postgresql: the queue tests' own server (tests/pg.py runs a throw-away cluster from
    # /usr/lib/postgresql/15/bin)
    apt-get install -y -q --no-install-recommends libsystemd-dev pkg-config gcc python3-dev \
        zsh postgresql >/dev/null
    if [ -f tests/e2e/prepare.sh ]; then
        bash tests/e2e/prepare.sh  # systemd-nspawn, debootstrap, the .deb build tools
    fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
