#!/usr/bin/env bash
# GPU figures on a fresh CUDA machine, in one go (about 8 minutes with a warm pip cache; the install dominates):
#   1. a venv with PyPI's CUDA build of torch (the version constraints-cpu.txt pins) and pedseg;
#   2. the nnU-Net parity test on CUDA (tests/test_infer.py, marked gpu);
#   3. the full-size timing bundle's 5-fold x 8-mirroring ensemble on CUDA with fp16 and with bf16 autocast:
#      seconds, peak GPU memory (torch's maximum reserved), peak RSS;
#   4. the demo from synthetic DICOM to every output (SEG, SR, PDF) on CUDA, wall time.
# Goals (issue 18): ensemble <= 30 s of inference on an H100/H200-class GPU, peak GPU memory <= 12 GB,
# DICOM -> all outputs <= 90 s. Record the printed figures in bench/RESULTS.md with the date and the device.
#
#     bash bench/gpu.sh                 # from the repository root; PYTHON=python3.11 VENV=.venv-gpu by default
#     SKIP_INSTALL=1 bash bench/gpu.sh  # reuse a venv that already has CUDA torch and pedseg
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv-gpu}
OUT=${OUT:-scratch/bench/gpu}
PY="$VENV/bin/python"
export PYTHONUNBUFFERED=1
step() { printf '\n== %s  [%s]\n' "$*" "$(date -u +%T)"; }
START=$(date +%s)

step "install"
if [ -z "${SKIP_INSTALL:-}" ]; then
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip
    # PyPI's Linux torch wheels are the CUDA builds; the constraints file pins the same version as on CPU machines.
    "$PY" -m pip install --quiet "$(grep '^torch==' constraints-cpu.txt)"
    "$PY" -m pip install --quiet -c constraints-cpu.txt -e ".[test]"
fi
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch: check the driver and the torch build"
p = torch.cuda.get_device_properties(0)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {p.name}, {p.total_memory / 2**30:.0f} GiB, "
      f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
mkdir -p "$OUT"

step "parity with stock nnU-Net on CUDA (tests/test_infer.py -m gpu)"
"$VENV/bin/pytest" -q -m gpu tests/test_infer.py -p no:cacheprovider

step "full-size bundle, 5 folds x 8 mirrorings on CUDA: fp16 and bf16 autocast"
[ -f scratch/bench/fullsize-bundle/bundle.json ] || "$PY" bench/fullsize_bundle.py --folds 5
for precision in fp16 bf16; do
    echo "-- $precision"
    "$PY" bench/inference.py --bundle scratch/bench/fullsize-bundle --device cuda --variants ours \
        --precision "$precision"
done

step "demo: synthetic DICOM -> every output on CUDA"
rm -rf "$OUT/demo"
TIMEFORMAT='demo, DICOM -> all outputs: %R s wall'
time "$VENV/bin/pedseg" demo "$OUT/demo" --device cuda
grep -h '"backend"\|"precision"\|"device"' "$OUT"/demo/provenance.json || true

step "done in $(( $(date +%s) - START )) s"
