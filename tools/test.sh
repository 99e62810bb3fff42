#!/usr/bin/env bash
# Installs everything (CPU) and runs the whole test suite, slow full-size checks included.
# torch is installed first with its pin: an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# Two workers on the 2-core CI machine; full-size tests share one worker (memory).
exec python3 -m pytest -n 2 --dist loadgroup "$@"
