#!/usr/bin/env bash
# Idempotent install of what tests/browser/ needs:
#   * Chromium from Debian apt at /usr/bin/chromium (Playwright's own browser
#     download needs network access the test machines do not have), and
#   * the Python `playwright` package from PyPI (only its client library is used,
#     driving the system Chromium through `executable_path`).
# Safe to run again: each step is skipped when its result is already present.
# Run as root (or with sudo available) for the apt step.
set -euo pipefail

CHROMIUM="${SYNCD_CHROMIUM:-/usr/bin/chromium}"
PYTHON="${PYTHON:-python3}"

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

if [ -x "$CHROMIUM" ]; then
    echo "chromium: already installed at $CHROMIUM ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
else
    echo "chromium: installing from apt"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
    if [ ! -x "$CHROMIUM" ]; then
        echo "chromium: apt install finished but $CHROMIUM is missing" >&2
        exit 1
    fi
    echo "chromium: installed $("$CHROMIUM" --version 2>/dev/null || true)"
fi

if "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
    echo "playwright: already installed ($("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p'))"
else
    echo "playwright: installing from PyPI"
    "$PYTHON" -m pip install playwright
fi

# Deliberately no `playwright install`: it downloads browsers from a CDN.
echo "browser test prerequisites are in place"
