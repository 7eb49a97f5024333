r"""Everything worth measuring when a GPU/TPU is lent, in one run (< 8 min on one H100/H200).

Rows of one table:
- VQ-VDM Table 3: 100 DDPM steps of configs/ucf101.py's U-Net (float32, guidance 1: one forward
  a step, as the paper times it) on a 16x128x128 video's 4x16x16x4 latent vs on 16x64x64x3
  pixels, batch 1 and 8; seconds a batch, videos/s, and the pixel/latent ratio.
- Train steps at the paper's shapes (configs/ucf101.py: the VQGAN GAN step on 16x128x128 clips at
  its batch, the U-Net step on the latents) in bfloat16, with GFLOP/s and MFU; the U-Net step
  also with ``attention_impl`` 'cudnn' against 'xla'.
- I3D clips/s at FVD's protocol (16x128x128 uint8 clips resized to 16x224x224).

``--dry`` runs the same code at tiny shapes (configs/tiny.py cut to one level, 2 DDPM steps,
batch 1 for Table 3, one timed train step) on a CPU in < 60 s, so a broken path shows up before
device time is spent; there the U-Net step runs once, with 'auto' (XLA on a CPU) for 'cudnn',
and I3D is lowered and counted but not run.

  bash benchmarks/accelerator.sh            # on the accelerator
  bash benchmarks/accelerator.sh --dry      # CPU dry run (also: DRY_RUN=1)
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common
import scaling

from vqvdm_jax import runtime, sharding

flags.DEFINE_bool("dry", False, "Tiny shapes on CPU: checks every path in < 60 s.")
flags.DEFINE_list("sections", ["table3", "train", "i3d"], "Which parts to run.")
FLAGS = flags.FLAGS

ROOT = Path(__file__).resolve().parents[1]


def elapsed(start: float) -> str:
  return f"{time.perf_counter() - start:.0f}s"


def hlo_flops(lowered) -> float:
  """FLOPs of a lowered program before backend compilation (cuDNN convs count too)."""
  analysis = lowered.cost_analysis() or {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float(analysis.get("flops", 0.0))


def shrink_for_dry(config):
  """configs/tiny.py cut to the fewest levels: the dry run checks code paths, so it compiles
  as little as it can (XLA:CPU compile time, not FLOPs, is what a dry run spends)."""
  model = config.vqgan.model
  model.channel_multipliers, model.temporal_downsample, model.spatial_downsample = (1, 2), 2, 2
  model.attention_at_lowest = False
  config.vqgan.discriminator.num_layers = 1
  unet = config.diffusion.unet
  unet.channel_multipliers, unet.attention_levels = (1,), ()
  config.vqgan.train.batch_size = config.diffusion.train.batch_size = 2
  return config


def table3(config, steps: int, batches: tuple[int, int], runs: int) -> list[list[str]]:
  frames, size = config.data.num_frames, config.data.resolution
  model = config.vqgan.model
  latent = (frames // model.temporal_downsample, size // model.spatial_downsample,
            size // model.spatial_downsample, model.latent_channels)
  pixel = (frames, size // 2, size // 2, 3)
  rows, seconds = [], {}
  for name, shape in (("latent", latent), ("pixel", pixel)):
    for batch in batches:
      start = time.perf_counter()
      sample, params = common.make_ddpm_sampler(config, (batch, *shape), steps, 1.0)
      try:
        jax.block_until_ready(sample(params, 1))  # compile + warm-up
        times = []
        for run in range(runs if batch == batches[0] else 1):
          tick = time.perf_counter()
          jax.block_until_ready(sample(params, 2 + run))
          times.append(time.perf_counter() - tick)
        seconds[name, batch] = statistics.median(times)
        result = [f"{seconds[name, batch]:.3f}", f"{batch / seconds[name, batch]:.2f}"]
      except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
          raise
        result = ["out of memory", ""]
      video = (f"{frames}x{size}x{size} via {'x'.join(map(str, latent))}" if name == "latent"
               else "x".join(map(str, pixel)))
      rows.append([f"Table 3: {steps} DDPM steps, {name}", video, str(batch), *result, "", "",
                   elapsed(start)])
      print(" | ".join(rows[-1]), flush=True)
  for batch in batches:
    if ("latent", batch) in seconds and ("pixel", batch) in seconds:
      ratio = seconds["pixel", batch] / seconds["latent", batch]
      rows.append(["Table 3: pixel / latent time", "", str(batch), f"{ratio:.1f}x", "", "", "",
                   ""])
  return rows


def train_step_row(config, stage: str, label: str, steps: int) -> list[str]:
  """One stage's real jitted train step (scaling.py's cases): time, GFLOP/s and MFU."""
  dtype = config.diffusion.unet.dtype if stage == "diffusion" else config.vqgan.model.dtype
  batch = (config.diffusion.train.batch_size if stage == "diffusion"
           else config.vqgan.train.batch_size)
  config.mesh.shape = (1, 1)
  start = time.perf_counter()
  make_case = scaling._vqgan_case if stage == "vqgan" else scaling._diffusion_case
  with tempfile.TemporaryDirectory() as workdir:
    try:
      trainer, state, host_batch = make_case(config, batch, jax.devices()[:1], workdir)
      extra = (trainer.lpips_params,) if hasattr(trainer, "lpips_params") else ()
      flops = hlo_flops(trainer.train_step.lower(
          state, sharding.shard_batch(host_batch, trainer.mesh), *extra))
      state, _ = trainer.step(state, host_batch)  # compile + warm-up
      jax.block_until_ready(state)
      tick = time.perf_counter()
      for _ in range(steps):
        state, _ = trainer.step(state, host_batch)
      jax.block_until_ready(state)
      seconds = (time.perf_counter() - tick) / steps
      trainer.checkpointer.close()
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      return [label, dtype, str(batch), "out of memory", "", "", "", elapsed(start)]
  gflops = flops / seconds / 1e9
  peak = scaling.PEAK_TFLOPS.get(next((key for key in scaling.PEAK_TFLOPS if key[0] in
                                       jax.devices()[0].device_kind and key[1] == dtype), None))
  mfu = f"{100 * gflops / (1e3 * peak):.1f}%" if peak and flops else "n/a"
  return [label, dtype, str(batch), f"{seconds:.3f}", f"{batch / seconds:.1f} clips/s",
          f"{gflops:.0f}", mfu, elapsed(start)]


def train_steps(config_path: str, dry: bool) -> list[list[str]]:
  rows = []
  # Dry: one U-Net row, 'auto' (XLA on a CPU: the same program 'xla' would compile twice).
  cases = ((("vqgan", "xla"), ("diffusion", "auto")) if dry else
           (("vqgan", "xla"), ("diffusion", "xla"), ("diffusion", "cudnn")))
  for stage, attention_impl in cases:
    config = common.load_config(config_path)
    config.data.name = "synthetic"  # random clips of the config's shape; no dataset needed
    config.vqgan.model.dtype = config.diffusion.unet.dtype = "bfloat16"
    config.vqgan.model.attention_impl = "xla"
    config.diffusion.unet.attention_impl = attention_impl
    config.vqgan.loss.disc_start = 0  # the full GAN step, discriminator included
    if dry:
      shrink_for_dry(config)
    label = (f"train step: {'VQGAN (GAN + LPIPS)' if stage == 'vqgan' else 'U-Net'}, "
             f"{config.data.num_frames}x{config.data.resolution}², attention {attention_impl}")
    rows.append(train_step_row(config, stage, label, steps=1 if dry else 10))
    print(" | ".join(rows[-1]), flush=True)
  return rows


def i3d_rows(dry: bool) -> list[list[str]]:
  import ml_collections

  from vqvdm_jax.evaluation import features, i3d
  start = time.perf_counter()
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"shape": (-1,), "axes": ("data",)}))
  batch, size = (1, 16) if dry else (32, 128)
  extractor = features.FeatureExtractor(i3d.logits, i3d.load_variables(), mesh, batch)
  clips = np.random.default_rng(0).integers(0, 256, (extractor.batch_size, 16, size, size, 3),
                                            dtype=np.uint8)
  flops = hlo_flops(jax.jit(i3d.logits).lower(extractor.variables, clips))
  if dry:  # I3D always runs at 16x224x224: ~20 s on 2 cores. Lowered and counted only.
    return [[f"I3D logits (dry: lowered, not run), 16x{size}² -> 16x224²", "float32 HIGHEST",
             str(extractor.batch_size), "", "", f"{flops / 1e9:.0f} GFLOP", "", elapsed(start)]]
  seconds, _ = common.time_call(extractor, clips, repeats=5)
  return [[f"I3D logits (FVD features), 16x{size}² -> 16x224²", "float32 HIGHEST",
           str(extractor.batch_size), f"{seconds:.3f}",
           f"{extractor.batch_size / seconds:.1f} clips/s", f"{flops / seconds / 1e9:.0f}", "",
           elapsed(start)]]


def main(argv):
  del argv
  runtime.configure_jax()
  start = time.perf_counter()
  dry = FLAGS.dry
  config_path = str(ROOT / ("configs/tiny.py" if dry else "configs/ucf101.py"))
  matmul = common.matmul_gflops(256 if dry else 8192, repeats=1 if dry else 5)
  print(f"Device: {common.device_description()}; float32 matmul {matmul:.0f} GFLOP/s"
        f"{' (dry run: tiny shapes)' if dry else ''}", flush=True)
  rows = []
  if "table3" in FLAGS.sections:
    config = common.load_config(config_path)
    config = shrink_for_dry(config) if dry else config
    rows += table3(config, steps=2 if dry else 100, batches=(1,) if dry else (1, 8),
                   runs=1 if dry else 3)
  if "train" in FLAGS.sections:
    rows += train_steps(config_path, dry)
  if "i3d" in FLAGS.sections:
    rows += i3d_rows(dry)
  common.print_table(
      f"Accelerator run on {common.device_description()} ({time.strftime('%Y-%m-%d', time.gmtime())}"
      f"; float32 matmul {matmul:.0f} GFLOP/s; total {elapsed(start)})",
      ["what", "shape / dtype", "batch", "s per call", "throughput", "GFLOP/s", "MFU",
       "wall incl. compile"], rows)


if __name__ == "__main__":
  common.run_main(main)
