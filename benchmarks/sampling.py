r"""The shape of VQ-VDM's Table 3: 100 DDPM steps in latent space vs pixel space, one device.

Latent: a 16x128x128 video through the stage-2 U-Net on its 4x16x16x4 latent (decoding excluded,
as in the paper's table). Pixel: the same U-Net configuration on 16x64x64x3 frames. Each is timed
over ``--runs`` runs (mean +- std) after a warm-up compile; then videos/s at ``--large_batch`` and
peak device memory. The whole sampling loop is one compiled ``fori_loop``.

  python benchmarks/sampling.py                       # paper U-Net (configs/ucf101.py), GPU/TPU
  python benchmarks/sampling.py --config=configs/demo.py --runs=3 --steps=20   # a CPU-sized run
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import jax
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from vqvdm_jax import runtime  # noqa: E402

flags.DEFINE_string("config", "configs/ucf101.py", "Config whose U-Net is measured.")
flags.DEFINE_integer("steps", 100, "DDPM steps per sample (the paper: 100).")
flags.DEFINE_integer("runs", 10, "Timed runs per row (the paper: 10).")
flags.DEFINE_integer("large_batch", 8, "Batch for the videos/s row.")
flags.DEFINE_bool("pixel", True, "Also time the pixel-space model (16x64x64x3).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "U-Net compute dtype (default: config's).")
FLAGS = flags.FLAGS


def timed_runs(fn, *args, runs: int) -> tuple[float, float]:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.mean(times), (statistics.stdev(times) if runs > 1 else 0.0)


def main(argv):
  del argv
  runtime.configure_jax()
  config = common.load_config(FLAGS.config)
  config.diffusion.sample.guidance_scale = 1.0  # one forward per step, as the paper times it
  if FLAGS.dtype:
    config.diffusion.unet.dtype = FLAGS.dtype
  frames, size = config.data.num_frames, config.data.resolution
  ft, fs = config.vqgan.model.temporal_downsample, config.vqgan.model.spatial_downsample
  latent = (frames // ft, size // fs, size // fs, config.vqgan.model.latent_channels)
  pixel = (frames, size // 2, size // 2, 3)
  rows, means = [], {}
  cases = [("latent (VQ-VDM)", f"{frames}x{size}x{size} via {'x'.join(map(str, latent))}",
            latent)]
  if FLAGS.pixel:
    cases.append(("pixel (VDM-style)", f"{frames}x{size // 2}x{size // 2}", pixel))
  for name, label, shape in cases:
    sample, params = common.make_ddpm_sampler(config, (1, *shape), FLAGS.steps,
                                               config.diffusion.sample.guidance_scale)
    mean, std = timed_runs(sample, params, 1, runs=FLAGS.runs)
    means[name] = mean
    try:
      big, big_params = common.make_ddpm_sampler(
          config, (FLAGS.large_batch, *shape), FLAGS.steps, config.diffusion.sample.guidance_scale)
      big_mean, _ = timed_runs(big, big_params, 1, runs=max(1, FLAGS.runs // 3))
      videos_per_second = f"{FLAGS.large_batch / big_mean:.2f}"
    except jax.errors.JaxRuntimeError as error:  # a pixel-space batch can exceed the device
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      videos_per_second = "out of memory"
    rows.append([name, label, f"{mean:.3f} +- {std:.3f}", videos_per_second])
    print(" | ".join(rows[-1]), flush=True)  # a row as soon as it is measured
  if len(means) == 2:
    ratio = means["pixel (VDM-style)"] / means["latent (VQ-VDM)"]
    rows.append(["ratio pixel / latent", "", f"{ratio:.1f}x", ""])
  memory = common.peak_memory_gib()
  print(f"Device: {common.device_description()}; U-Net of {FLAGS.config} in "
        f"{config.diffusion.unet.dtype}; {FLAGS.steps} DDPM "
        f"steps; peak device memory: {'n/a' if memory is None else f'{memory:.2f} GiB'}")
  common.print_table("Sampling time (VQ-VDM Table 3 shape)",
                     ["model", "video", f"batch 1, s ({FLAGS.runs} runs)",
                      f"videos/s at batch {FLAGS.large_batch}"], rows)


if __name__ == "__main__":
  common.run_main(main)
