#!/usr/bin/env bash
# Set-up and entry point. On first use it makes .venv (seeing system packages, so a CUDA torch
# installed there is kept), installs torch only if none is importable (the CPU build torch==2.13.0
# here; set HDFUNC_TORCH to choose another), then hdfunc with its test and peers extras (the
# peers: the optimizers docs/peers.md compares HD with, so their tests run).
#   bash run.sh            # the main job: the demo (verification summary + a small study)
#   bash run.sh test       # the tests
#   bash run.sh <hdfunc subcommand> ...   e.g. bash run.sh study --help
set -euo pipefail
cd "$(dirname "$0")"
venv="${HDFUNC_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.hdfunc-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if ! "$py" -c "import torch" 2>/dev/null; then
        "$py" -m pip install --disable-pip-version-check "${HDFUNC_TORCH:-torch==2.13.0}"
    fi
    "$py" -m pip install --disable-pip-version-check -q -e ".[test,peers]"
    touch "$stamp"
fi
command="${1:-demo}"
[ $# -gt 0 ] && shift
case "$command" in
    test)
        "$py" -m pytest -q "$@"
        ;;
    *)
        exec "$venv/bin/hdfunc" "$command" "$@"
        ;;
esac
