#!/usr/bin/env bash
# Set up a virtual environment (once) and run the demo or the tests.
#   scripts/dev.sh demo [prunekit demo options]
#   scripts/dev.sh test [pytest options]          in .venv, with the newest transformers prunekit supports
#   scripts/dev.sh test-oldest [pytest options]   in .venv-oldest, with the oldest one (prunekit/contracts.py: OLDEST)
set -euo pipefail
cd "$(dirname "$0")/.."
command="${1:-test}"
shift || true
python="${PYTHON:-python3}"
constraints=()
case "$command" in
    test-oldest)
        venv="${PRUNEKIT_VENV:-.venv-oldest}"
        oldest="$(sed -n 's/^OLDEST = "\(.*\)"$/\1/p' prunekit/contracts.py)"
        [ -n "$oldest" ] || { echo "no OLDEST in prunekit/contracts.py" >&2; exit 2; }
        pin="$(mktemp)"
        trap 'rm -f "$pin"' EXIT
        echo "transformers==$oldest" > "$pin"
        constraints=(-c "$pin")
        ;;
    *) venv="${PRUNEKIT_VENV:-.venv}" ;;
esac
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    # Take a torch wheel that pip can already see on this machine (its find-links), if there is one, so that a
    # local CPU build is used instead of downloading the newest CUDA build; otherwise pip chooses as usual.
    # No version is pinned: any torch >= 2.4 that is already installed is kept.
    "${pip[@]}" install -q --no-index --no-deps "torch>=2.4" >/dev/null 2>&1 || "${pip[@]}" install -q "torch>=2.4"
fi
"${pip[@]}" install -q "${constraints[@]}" -e ".[test,docs]"

case "$command" in
    demo) exec "$venv/bin/prunekit" demo "$@" ;;
    test|test-oldest)
        "$venv/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
        "$venv/bin/python" -m pytest "$@" ;;
    *) echo "usage: scripts/dev.sh demo|test|test-oldest [options]" >&2; exit 2 ;;
esac
