#!/usr/bin/env bash
# Installs roiscribe with its test extra and runs the test suite. README's test command and
# .ci/run both call this script, so they cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
# the Label Studio server the tests start lives in its own virtualenv (it pins its own Django)
python -m sinks.label_studio.server install
python -m pytest "$@"
