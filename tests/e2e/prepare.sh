#!/bin/bash
# prepare.sh - install (idempotently) what the end-to-end tests and the .deb build need on a
# Debian 12 host, and build the guest root file system cache. Safe to run again: it skips
# whatever is already there.
#
#   bash tests/e2e/prepare.sh            # host packages + cached guest and stock rootfs
#   bash tests/e2e/prepare.sh --no-rootfs  # host packages only (the tests build the rootfs on demand)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

HOST_PACKAGES=(
    systemd-container debootstrap debian-archive-keyring
    debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools
    python3-systemd python3-click python3-sdnotify python3-pythonjsonlogger
    lintian fakeroot dpkg-dev
)
missing=()
for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "prepare.sh: apt-get install ${missing[*]}"
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "prepare.sh: host packages already installed"
fi

# the real agent CLIs (Claude Code, Codex) come from the npm registry
if ! command -v npm >/dev/null; then
    echo "prepare.sh: apt-get install nodejs npm"
    apt-get install -y -q --no-install-recommends nodejs npm >/dev/null
fi

if [ "${1:-}" != "--no-rootfs" ]; then
    # the guest rootfs: same code path as the test session uses (cached, keyed by its package list)
    cd "$HERE/../.."
    /usr/bin/python3 -m tests.e2e.guest rootfs
    /usr/bin/python3 -m tests.e2e.guest clis
    /usr/bin/python3 -m tests.e2e.stock rootfs   # the stock Debian of test_quickstart.py
fi
