r"""Train-step throughput of both stages over devices, parameter shardings and compute dtypes.

For each (stage, devices, sharding, dtype) the real jitted train step of that stage is built on a
mesh of the first N devices -- ``replicated``: N x 1 (data x fsdp), ``fsdp``: 1 x N -- with a
global batch of ``--batch_per_device`` x N, compiled, warmed up, and timed over ``--steps`` steps.
FLOPs per step are XLA's own count (``cost_analysis``); model FLOPs utilisation is printed when
the device's peak is known (or given with ``--peak_tflops``).

  python benchmarks/scaling.py --stages=diffusion --devices=1 --dtypes=float32,bfloat16  # GPU
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py     # CPU sim
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from vqvdm_jax import runtime  # noqa: E402
from vqvdm_jax.models.vqgan import latent_shape  # noqa: E402

flags.DEFINE_string("config", "configs/demo.py", "Config whose models are measured.")
flags.DEFINE_list("stages", ["vqgan", "diffusion"], "Stages to measure.")
flags.DEFINE_list("devices", ["1", "2", "4", "8"], "Device counts (first N devices).")
flags.DEFINE_list("shardings", ["replicated", "fsdp"], "Parameter shardings.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes (parameters stay float32).")
flags.DEFINE_integer("batch_per_device", 2, "Clips per device per step.")
flags.DEFINE_integer("steps", 5, "Timed steps per row, after one compile-and-warm-up step.")
flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device (0: from a known table).")
FLAGS = flags.FLAGS

# Dense peak TFLOP/s per chip by compute dtype (vendor data sheets, no sparsity).
PEAK_TFLOPS = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0,
}


def peak_tflops(dtype: str) -> float | None:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops
  kind = jax.devices()[0].device_kind
  for (name, peak_dtype), value in PEAK_TFLOPS.items():
    if name in kind and peak_dtype == dtype:
      return value
  return None


def _configure(dtype: str, num_devices: int, param_sharding: str):
  config = common.load_config(FLAGS.config)
  config.vqgan.model.dtype = dtype
  config.diffusion.unet.dtype = dtype
  config.mesh.shape = (num_devices, 1) if param_sharding == "replicated" else (1, num_devices)
  config.mesh.param_sharding = param_sharding
  batch = FLAGS.batch_per_device * num_devices
  config.vqgan.train.batch_size = batch
  config.diffusion.train.batch_size = batch
  config.vqgan.loss.disc_start = 0  # time the full GAN step
  return config, batch


def _vqgan_case(config, batch, devices, workdir):
  from vqvdm_jax.training import vqgan_trainer
  trainer = vqgan_trainer.VQGANTrainer(config, workdir, devices=devices)
  data = config.data
  rng = np.random.default_rng(0)
  host_batch = {"video": rng.integers(0, 256, (batch, data.num_frames, data.resolution,
                                               data.resolution, 3), dtype=np.uint8)}
  return trainer, trainer.initial_state(), host_batch


def _diffusion_case(config, batch, devices, workdir):
  from vqvdm_jax.training import diffusion_trainer
  shape = latent_shape(config)[1:]
  trainer = diffusion_trainer.DiffusionTrainer(config, workdir, shape, devices=devices)
  rng = np.random.default_rng(0)
  host_batch = {"latent": rng.normal(size=(batch, *shape)).astype(np.float32),
                "label": rng.integers(0, config.data.num_classes, batch).astype(np.int32),
                "fps": np.full(batch, 8.0, np.float32)}
  return trainer, trainer.initial_state(1.0, 0), host_batch


def _step_flops(trainer, state, host_batch) -> float:
  from vqvdm_jax import sharding
  batch = sharding.shard_batch(host_batch, trainer.mesh)
  extra = (trainer.lpips_params,) if hasattr(trainer, "lpips_params") else ()
  analysis = trainer.train_step.lower(state, batch, *extra).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def measure(stage: str, num_devices: int, param_sharding: str, dtype: str) -> list[str]:
  config, batch = _configure(dtype, num_devices, param_sharding)
  devices = jax.devices()[:num_devices]
  make_case = _vqgan_case if stage == "vqgan" else _diffusion_case
  with tempfile.TemporaryDirectory() as workdir:
    trainer, state, host_batch = make_case(config, batch, devices, workdir)
    compile_start = time.perf_counter()
    flops = _step_flops(trainer, state, host_batch)  # the step's compile happens here
    state, _ = trainer.step(state, host_batch)  # warm-up
    jax.block_until_ready(state)
    compile_seconds = time.perf_counter() - compile_start
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      state, _ = trainer.step(state, host_batch)
    jax.block_until_ready(state)
    seconds = (time.perf_counter() - start) / FLAGS.steps
    trainer.checkpointer.close()
  peak = peak_tflops(dtype)
  achieved = flops / seconds / 1e9  # GFLOP/s; XLA counts the whole (global) program
  mfu = f"{100 * achieved / (1e3 * peak * num_devices):.1f}%" if peak and flops else "n/a"
  return [stage, str(num_devices), param_sharding, dtype, str(batch), f"{1 / seconds:.2f}",
          f"{batch / seconds:.1f}", f"{compile_seconds:.0f}", f"{achieved:.1f}", mfu]


def main(argv):
  del argv
  runtime.configure_jax()
  rows = []
  for stage in FLAGS.stages:
    for count in map(int, FLAGS.devices):
      if count > jax.device_count():
        continue
      for param_sharding in FLAGS.shardings:
        if param_sharding == "fsdp" and count == 1:
          continue  # identical to replicated on one device
        for dtype in FLAGS.dtypes:
          rows.append(measure(stage, count, param_sharding, dtype))
          print(" | ".join(rows[-1]), flush=True)
  print(f"Device: {common.device_description()}; config {FLAGS.config}; "
        f"{FLAGS.batch_per_device} clips per device; {FLAGS.steps} timed steps")
  common.print_table("Train-step scaling",
                     ["stage", "devices", "params", "dtype", "batch", "steps/s", "clips/s",
                      "compile s", "GFLOP/s", "MFU"], rows)


if __name__ == "__main__":
  common.run_main(main)
