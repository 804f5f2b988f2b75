#!/usr/bin/env bash
# A GPU session's checks, as one command that ends inside one 10-minute device call. Prepare the wheels first
# (bash bench/device_prepare.sh), then on the GPU machine, from the repository root:
#
#   bash bench/device_check.sh 2b     # CUDA tests (flex gradients, Liger vs plain, Liger loss vs tiles), then
#                                     # bench_gpu.py on the 2B shape, every default side
#   bash bench/device_check.sh 9b     # bench_gpu.py on the 9B shape: TRL, defaults, fused, and flex at 8,192
#                                     # tokens (the 22 GiB target)
#   bash bench/device_check.sh post   # bench_post.py dpo, rl, distill on the GPU: plain TRL beside gemma2-tune
#
# Every step runs under one deadline (BUDGET_S seconds from the start, default 560) so the files come back
# from a 10-minute call: $OUT (the device tool's folder) or ./device-out gets versions.txt, tests.log,
# bench-<shape>.log, results_gpu_<shape>.json (written after every side) and steps.txt (each step's exit
# status; 124/137 = cut by the deadline). Exit status: 0 when every step passed, else the first failure's.
# SKIP_INSTALL=1 runs it here with .venv (or PYTHON) to check the script: on a CPU the CUDA tests skip, the
# bench runs --smoke, and triton / liger-kernel are not required.
set -uo pipefail
cd "$(dirname "$0")/.."
SHAPE=${1:-2b}
case "$SHAPE" in 2b|9b|post) ;; *) echo "usage: bench/device_check.sh 2b|9b|post"; exit 2;; esac
OUT=${OUT:-$PWD/device-out}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-560} ))
mkdir -p "$OUT"
: > "$OUT/steps.txt"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
STATUS=0

step() {  # step NAME LIMIT_S LOG COMMAND...: run under min(LIMIT_S, time left), record its exit status
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( DEADLINE - $(date +%s) - 20 ))  # timeout -k below may add 15 s to kill a step
  (( left < limit )) && limit=$left
  if (( limit <= 0 )); then
    echo "$name skipped: no time left" | tee -a "$OUT/steps.txt"; [ "$STATUS" -eq 0 ] && STATUS=124; return
  fi
  timeout -k 15 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  echo "$name exit $rc (limit ${limit}s)" | tee -a "$OUT/steps.txt"
  [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ] && STATUS=$rc
}

if [ -z "${SKIP_INSTALL:-}" ]; then
  step install 120 "$OUT/install.log" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  [ "$STATUS" -eq 0 ] || { echo "installing .whl/ failed (run bench/device_prepare.sh here and carry .whl)"; exit 3; }
  export PYTHONPATH=/tmp/site:$PWD
  PY=python3
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  PY=${PYTHON:-.venv/bin/python}
fi

# versions, and every import the checks need, before spending time on anything else
step versions 60 "$OUT/versions.txt" "$PY" - <<'EOF'
import importlib, importlib.metadata, sys
import torch
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "|", torch.cuda.get_device_name(0) if cuda else "no GPU")
needed = ["transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "pydantic", "typer", "pyarrow"]
needed += ["triton", "liger_kernel"] if cuda else []  # GPU kernels: not needed to check this script on a CPU
missing = []
for name in needed:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", None) or importlib.metadata.version(name.replace("_", "-")))
    except Exception as exc:  # noqa: BLE001 (report every failure, then stop)
        missing.append(f"{name}: {exc!r}")
if missing:
    print("CANNOT IMPORT:", *missing, sep="\n  ")
    sys.exit(3)
EOF
[ "$STATUS" -eq 0 ] || exit "$STATUS"
SMOKE=$("$PY" -c "import torch; print('' if torch.cuda.is_available() else '--smoke')")

if [ "$SHAPE" = "2b" ]; then
  # flex gradients vs eager, Liger vs the plain model, Liger's loss vs the tiles; on a CPU these skip
  step tests 150 "$OUT/tests.log" "$PY" -m pytest -q -rs -p no:cacheprovider tests/e2e/test_attention.py \
    tests/unit/test_kernels.py
  step bench-2b 600 "$OUT/bench-2b.log" "$PY" bench/bench_gpu.py $SMOKE --shapes 2b \
    --json "$OUT/results_gpu_2b.json"
elif [ "$SHAPE" = "post" ]; then
  DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
  QUICK=$([ "$DEVICE" = cpu ] && echo --quick)
  step bench-dpo 280 "$OUT/bench-dpo.log" "$PY" bench/bench_post.py dpo --device "$DEVICE" $QUICK \
    --json "$OUT/results_dpo_gpu.json"
  step bench-rl 250 "$OUT/bench-rl.log" "$PY" bench/bench_post.py rl --sides trl,gemma2-tune --device "$DEVICE" \
    $QUICK --json "$OUT/results_rl_gpu.json"
  # distill.loss=auto keeps TRL's Triton divergence on a GPU; gemma2-tune-rows measures ours beside it
  step bench-distill 120 "$OUT/bench-distill.log" "$PY" bench/bench_post.py distill \
    --sides trl,gemma2-tune,gemma2-tune-rows --device "$DEVICE" $QUICK --json "$OUT/results_distill_gpu.json"
else
  step bench-9b 600 "$OUT/bench-9b.log" "$PY" bench/bench_gpu.py --shapes 9b --steps 8 \
    --sides trl,gemma2-tune,gemma2-tune-fused,gemma2-tune-flex-8192 --json "$OUT/results_gpu_9b.json"
fi
cat "$OUT/steps.txt"
exit "$STATUS"
