#!/usr/bin/env bash
# The one GPU benchmark command: adiff-jax vs diffusers side by side (bench/gpu_bench.py).
#
#   bash bench/gpu.sh              # on the H200: SD1.5 + v2 motion module, ~8 min budget in all
#   bash bench/gpu.sh --reduced    # same code path on CPU, tiny model (what tests/test_gpu_bench.py runs)
#   extra arguments go to bench/gpu_bench.py (--budget S, --parts jax_sample,torch_sample,...)
#
# Results: $OUT if set (the device machine's folder that comes back), else bench/gpu_out/:
#   results.jsonl  one JSON line per measurement, written as it is measured
#   rows.md        the rows for bench/RESULTS.md (add: python bench/gpu_bench.py --append-rows rows.md)
#   gpu_bench.log  every part's output;  setup.log  this script's setup notes
#
# diffusers is not installed on the GPU machine and it has no network. Beforehand, HERE, fill
# the git-ignored .whl/ with the diffusers wheel (pure Python, so no platform flags needed):
#   python3 -m pip download diffusers==0.42.1 --no-deps -d .whl
# diffusers' other requirements (filelock, huggingface-hub>=1.32, numpy, regex, requests,
# safetensors>=0.8, Pillow) are all in the GPU image (huggingface_hub 1.33, safetensors 0.8.0
# seen there); importlib_metadata, its one requirement the image lacks, is only imported on
# Python < 3.8, so it is not needed (the image has 3.12). If a newer diffusers needs more, add
# those wheels too (`unzip -p .whl/diffusers-*.whl '*/METADATA' | grep ^Requires-Dist`).
# Then, with the device tool:  run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=570)
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-bench/gpu_out}"
mkdir -p "$OUT_DIR"
: >"$OUT_DIR/setup.log"
say() { echo "[gpu.sh] $*" | tee -a "$OUT_DIR/setup.log"; }

say "$(date -u +%FT%TZ) $PY: $($PY -c 'import sys; print(sys.version.split()[0])')"
command -v nvidia-smi >/dev/null && say "$(nvidia-smi --query-gpu=name,memory.used,memory.total,driver_version --format=csv,noheader 2>&1)"

dver() { $PY -c "import diffusers; print(diffusers.__version__)" 2>>"$OUT_DIR/setup.log"; }
if ! DVER=$(dver); then
  if ls .whl/*.whl >/dev/null 2>&1; then
    # --no-deps: pip would otherwise insist on importlib_metadata, which Python 3.12 never imports.
    SITE=/tmp/adiff_site
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >>"$OUT_DIR/setup.log" 2>&1; then
      export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
      say "installed from .whl/: $(cd .whl && ls *.whl | tr '\n' ' ')"
    else
      say "pip install from .whl/ failed (see setup.log)"
    fi
  fi
  if ! DVER=$(dver); then
    export GPU_BENCH_DIFFUSERS=missing
    say "WARNING: diffusers is NOT importable: only the JAX half runs (no ratios)."
    say "         Put its wheel in .whl/ first: python3 -m pip download diffusers==0.42.1 --no-deps -d .whl"
  fi
fi
say "diffusers: ${DVER:-missing}"

exec $PY bench/gpu_bench.py --out "$OUT_DIR" --command "bash bench/gpu.sh${*:+ $*}" "$@"
