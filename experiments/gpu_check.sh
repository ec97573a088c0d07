#!/usr/bin/env bash
# The GPU checks in one command, for a machine with CUDA, torch and triton of its own and no network
# (the `device` tool's machines). Their image lacks omegaconf, so bring its wheels once:
#   python -m pip download --no-deps -d .gpu_wheels omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
#   bash experiments/gpu_check.sh        # there, carrying .gpu_wheels
# 1. the fused Triton kernel against the masked path on the GPU (tests/test_fused.py's check);
# 2. the layer benchmark, fused kernel and gather path, float32 and bfloat16, into $OUT (or benchmark/).
# Back here, plot one with: python experiments/fig_wallclock.py --input FILE --name fig_wallclock_cuda
set -euo pipefail
export PYTHONPATH="$PWD/src:$PWD" PYTHONUNBUFFERED=1
python3 -c "import omegaconf" 2>/dev/null || python3 -m pip install -q --no-deps .gpu_wheels/*.whl
out=${OUT:-benchmark}
python3 - <<'PY'
import torch

from tests.test_fused import check_fused_equals_masked

torch.backends.cuda.matmul.allow_tf32 = False  # the kernel follows torch's setting; compare exactly
check_fused_equals_masked("cuda")
print("fused == masked on", torch.cuda.get_device_name(), "torch", torch.__version__)
PY
for dtype in float32 bfloat16; do
  for impl in fused gather; do
    python3 experiments/bench_wallclock.py --device cuda --impl "$impl" --dtype "$dtype" --repeats 20 \
      --out "$out/bench_wallclock_cuda_${impl}_${dtype}.json"
  done
done
