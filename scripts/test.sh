#!/usr/bin/env bash
# Installs roiscribe with its test extra and runs the test suite. README's test command and
# .ci/run both call this script, so they cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# the Label Studio server the tests start lives in its own virtualenv (it pins its own Django)
python -m sinks.label_studio.server install
# the browser tests drive the system's Chromium (Debian's package) through Playwright; Playwright's
# own browser download is never used. Installed here when missing (needs root, as in CI).
chromium="${ROISCRIBE_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "scripts/test.sh: no Chromium at $chromium; install Debian's chromium (or set ROISCRIBE_CHROMIUM)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
    [ -x "$chromium" ] || { echo "scripts/test.sh: apt-get installed no $chromium" >&2; exit 1; }
fi
export ROISCRIBE_CHROMIUM="$chromium"
export ROISCRIBE_BROWSER_TESTS=required  # here the browser tests fail rather than skip when something is missing
python -m pytest "$@"
