#!/usr/bin/env bash
# Prepare the wheels a GPU machine without network needs to run bench/device_check.sh, into .whl/ (ignored).
#
#   bash bench/device_prepare.sh          # here, with registry access; ~25 MB
#
# The target: Python 3.12 on x86-64 Linux with torch, triton, accelerate and the rest of the lent H200 image
# holds (see the device notes: torch 2.11, transformers 5.17, no trl, bitsandbytes, datasets or pydantic). The
# wheels are the versions this project is tested with; bitsandbytes' wheel keeps only its CUDA 13.0 and CPU
# libraries (43 MB -> ~4 MB), its RECORD rewritten to match.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=.whl
PACKAGES=(
  trl==1.16.0 transformers==5.24.0 tokenizers==0.23.3 peft==0.21.2
  bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  typer==0.29.2 liger-kernel==0.8.5
)
rm -rf "$DEST" && mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${PACKAGES[@]}"

# bitsandbytes: keep libbitsandbytes_cuda130.so and the CPU library only
"$PY" - "$DEST" <<'EOF'
import base64, hashlib, sys, zipfile
from pathlib import Path

dest = Path(sys.argv[1])
wheel = next(dest.glob("bitsandbytes-*.whl"))
keep = lambda name: not name.endswith((".so", ".dll", ".dylib")) or name.endswith(("_cuda130.so", "_cpu.so"))
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
    names = [n for n in src.namelist() if keep(n)]
    record = next(n for n in names if n.endswith(".dist-info/RECORD"))
    lines = []
    for name in names:
        if name == record:
            continue
        data = src.read(name)
        out.writestr(name, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    out.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    dropped = sorted(set(src.namelist()) - set(names))
slim.replace(wheel)
print(f"{wheel.name}: kept {len(names)} files, dropped {len(dropped)} libraries, "
      f"{wheel.stat().st_size / 2**20:.1f} MiB")
EOF
du -sh "$DEST"
ls "$DEST"
