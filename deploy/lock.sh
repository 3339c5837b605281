#!/usr/bin/env bash
# Regenerates the hashed locks the Dockerfile installs from. Needs uv (`pip install uv`), PyPI, and a
# PyPI-style index of PyTorch's builds (TORCH_INDEX_URL; default: PyTorch's own, for the build asked for).
#   deploy/lock.sh                # build, service, and trainer locks for the CPU torch build
#   deploy/lock.sh cu128          # ... and for another PyTorch build (its index's name)
# Every lock targets CPython 3.11 on Linux (the python:3.11 base image); each pinned version
# carries the hashes of all its files, so pip picks the right wheel on x86_64 and arm64 alike.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-uv}
VARIANT=${1:-cpu}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/${VARIANT}}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The pins come from pyproject.toml: setuptools for building the wheel, torch for the trainer.
python3 - "$tmp" <<'PY'
import re, sys, tomllib
from pathlib import Path
meta = tomllib.loads(Path("pyproject.toml").read_text())
out = Path(sys.argv[1])
(out / "build.in").write_text("\n".join(meta["build-system"]["requires"]) + "\n")
torch = next(r for r in meta["project"]["optional-dependencies"]["trainer"] if re.match(r"torch\b", r))
(out / "torch.version").write_text(torch.split("==", 1)[1].strip())
PY
torch_pin="torch==$(cat "$tmp/torch.version")+${VARIANT}"
echo "$torch_pin" > "$tmp/torch.in"

compile() {  # compile COMMAND OUT ARGS...: a hashed lock for CPython 3.11 on Linux
    local command=$1 out=$2
    shift 2
    "$UV" pip compile --quiet --no-config --generate-hashes --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 --custom-compile-command "$command" \
        --output-file "$out" "$@"
    sed -i "s|$tmp/||" "$out"  # name the inputs, not where they were written
}

compile deploy/lock.sh deploy/requirements-build.txt --index-url https://pypi.org/simple "$tmp/build.in"
compile deploy/lock.sh deploy/requirements-service.txt --index-url https://pypi.org/simple \
    --extra service pyproject.toml
# torch alone, hashed as PyTorch's index lists it; the Dockerfile installs it from there, --no-deps
compile "deploy/lock.sh ${VARIANT}" "deploy/requirements-torch-${VARIANT}.txt" \
    --index-url "$TORCH_INDEX_URL" --no-deps "$tmp/torch.in"
# everything else the trainer runs, torch's own requirements included, from PyPI only (torch's
# page is read for its metadata, and torch itself left out)
compile "deploy/lock.sh ${VARIANT}" "deploy/requirements-trainer-${VARIANT}.txt" \
    --index-url https://pypi.org/simple --find-links "$TORCH_INDEX_URL/torch/" --constraint "$tmp/torch.in" \
    --no-emit-package torch --extra trainer pyproject.toml
