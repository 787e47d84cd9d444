#!/usr/bin/env bash
# Set up a virtual environment in .venv (once) and run the demo or the tests.
#   scripts/dev.sh demo [prunekit demo options]
#   scripts/dev.sh test [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${PRUNEKIT_VENV:-.venv}"
python="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    # Take a torch wheel that pip can already see on this machine (its find-links), if there is one, so that a
    # local CPU build is used instead of downloading the newest CUDA build; otherwise pip chooses as usual.
    # No version is pinned: any torch >= 2.4 that is already installed is kept.
    "${pip[@]}" install -q --no-index --no-deps "torch>=2.4" >/dev/null 2>&1 || "${pip[@]}" install -q "torch>=2.4"
fi
"${pip[@]}" install -q -e ".[test,docs]"

command="${1:-test}"
shift || true
case "$command" in
    demo) exec "$venv/bin/prunekit" demo "$@" ;;
    test) exec "$venv/bin/python" -m pytest "$@" ;;
    *) echo "usage: scripts/dev.sh demo|test [options]" >&2; exit 2 ;;
esac
