#!/usr/bin/env bash
# One run of everything worth measuring on a lent GPU/TPU, printed as one table (< 8 minutes on
# one H100/H200): VQ-VDM Table 3 (latent vs pixel sampling), both train steps in bfloat16 with
# MFU, attention_impl xla vs cudnn, and I3D clips/s. See benchmarks/accelerator.py.
#
#   bash benchmarks/accelerator.sh            # on the accelerator; paste the table into RESULTS.md
#   bash benchmarks/accelerator.sh --dry      # the same code at tiny shapes on a CPU (< 60 s)
#   DRY_RUN=1 bash benchmarks/accelerator.sh  # same as --dry
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
for arg in "$@"; do
  if [[ "$arg" == "--dry" ]]; then DRY_RUN=1; else args+=("$arg"); fi
done
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  args+=("--dry")
  export JAX_PLATFORMS=cpu
  # Compile-bound at tiny shapes: XLA:CPU's optimisation level 0 compiles ~2.5x faster.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
else
  # Let XLA take most of the device: the pixel-space batch of Table 3 is large.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
fi
exec python benchmarks/accelerator.py "${args[@]}"
