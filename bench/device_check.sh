#!/usr/bin/env bash
# A GPU session's checks, as one command that ends inside one 10-minute device call. Prepare the wheels first
# (bash bench/device_prepare.sh), then on the GPU machine, from the repository root:
#
#   bash bench/device_check.sh 2b     # CUDA tests (flex gradients, Liger vs plain), then bench_gpu.py on the
#                                     # 2B shape, every side (~7 minutes)
#   bash bench/device_check.sh 9b     # bench_gpu.py on the 9B shape: TRL, defaults, fused, and flex at 8,192
#                                     # tokens (the 22 GiB target) (~8 minutes)
#
# Results go to $OUT (the device tool's folder that comes back) or ./device-out: versions.txt, tests.log,
# bench-<shape>.log, results_gpu_<shape>.json. Each step has its own time limit so the files come back.
# SKIP_INSTALL=1 PYTHON=.venv/bin/python runs it on this machine (CPU: tests skip, bench --smoke) to check it.
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPE=${1:-2b}
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
if [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl/ failed (run bench/device_prepare.sh here and carry .whl)"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  PY=${PYTHON:-.venv/bin/python}
fi

# versions, and every import the checks need, before spending time on anything else
"$PY" - <<'EOF' 2>&1 | tee "$OUT/versions.txt"
import importlib, importlib.metadata, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
missing = []
for name in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic", "typer", "triton",
             "liger_kernel", "pyarrow"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", None) or importlib.metadata.version(name.replace("_", "-")))
    except Exception as exc:  # noqa: BLE001 (report every failure, then stop)
        missing.append(f"{name}: {exc!r}")
if missing:
    print("CANNOT IMPORT:", *missing, sep="\n  ")
    sys.exit(3)
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 3

if [ "$SHAPE" = "2b" ]; then
  # flex gradients vs eager, Liger vs the plain model (fp32); on a CPU these skip with their reasons
  timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_attention.py tests/test_kernels.py 2>&1 \
    | tee "$OUT/tests.log" | tail -15
  SMOKE=$([ -n "${SKIP_INSTALL:-}" ] && "$PY" -c "import torch; print('' if torch.cuda.is_available() else '--smoke')")
  timeout 420 "$PY" bench/bench_gpu.py $SMOKE --shapes 2b --json "$OUT/results_gpu_2b.json" 2>&1 | tee "$OUT/bench-2b.log"
elif [ "$SHAPE" = "9b" ]; then
  timeout 540 "$PY" bench/bench_gpu.py --shapes 9b --steps 8 --sides trl,gemma2-tune,gemma2-tune-fused,gemma2-tune-flex-8192 \
    --json "$OUT/results_gpu_9b.json" 2>&1 | tee "$OUT/bench-9b.log"
else
  echo "usage: bench/device_check.sh 2b|9b"; exit 2
fi
