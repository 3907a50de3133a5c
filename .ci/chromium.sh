#!/usr/bin/env bash
# Installs the headless browser the dashboard's browser tests drive: Debian's
# `chromium` and `chromium-driver` (chromedriver). Idempotent: does nothing when
# both are already on the PATH. Never downloads a browser build of its own.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    echo "chromium.sh: chromium and chromedriver present ($(chromium --version 2>/dev/null | head -n1))"
    exit 0
fi

if ! have apt-get; then
    echo "chromium.sh: apt-get not found; install chromium and chromedriver by hand" >&2
    exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
echo "chromium.sh: installing chromium and chromium-driver with apt-get"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null

have chromium || { echo "chromium.sh: chromium still missing after install" >&2; exit 1; }
have chromedriver || { echo "chromium.sh: chromedriver still missing after install" >&2; exit 1; }
echo "chromium.sh: installed $(chromium --version 2>/dev/null | head -n1); $(chromedriver --version | head -n1)"
