r"""Stage-1 speed: encode, decode and a full GAN train step of the 3D VQGAN.

Prints a markdown table: median time, clips/s, achieved GFLOP/s and its fraction of this run's
float32 matmul rate, and peak device memory (where reported), for each conv implementation.

  python benchmarks/vqgan.py                                  # paper model, 16x64x64 on CPU
  python benchmarks/vqgan.py --resolution=128 --batch_sizes=1,8   # the paper's shape (GPU/TPU)
  python benchmarks/vqgan.py --config=configs/demo.py --frames=8 --resolution=32 --batch_sizes=4 \
      --conv_impls=auto --adaptive_disc_weight                  # the demo's step, Taming's weight
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from vqvdm_jax import runtime  # noqa: E402
from vqvdm_jax.models.vqgan import VQGAN3D  # noqa: E402
from vqvdm_jax import sharding  # noqa: E402
from vqvdm_jax.training import vqgan_trainer  # noqa: E402

flags.DEFINE_string("config", "configs/ucf101.py", "Config whose model is measured.")
flags.DEFINE_integer("frames", 16, "Clip length.")
flags.DEFINE_integer("resolution", None, "Frame size (default: 128 on GPU/TPU, 64 on CPU).")
flags.DEFINE_list("batch_sizes", ["1", "4"], "Batch sizes to measure.")
flags.DEFINE_list("conv_impls", ["native", "taps"], "3D conv implementations to compare.")
flags.DEFINE_integer("repeats", 3, "Timed calls per row (median reported).")
flags.DEFINE_bool("train", True, "Also time the full train step.")
flags.DEFINE_bool("adaptive_disc_weight", False,
                  "Train step with Taming's adaptive discriminator weight (vqgan.loss).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  runtime.configure_jax()
  resolution = FLAGS.resolution or (64 if jax.default_backend() == "cpu" else 128)
  matmul = common.matmul_gflops()
  rows = []
  for conv_impl in FLAGS.conv_impls:
    for batch_size in map(int, FLAGS.batch_sizes):
      config = common.load_config(FLAGS.config)
      config.data.name = "synthetic"
      config.data.num_frames = FLAGS.frames
      config.data.resolution = resolution
      config.vqgan.model.conv_impl = conv_impl
      config.vqgan.loss.disc_start = 0  # time the full step, discriminator included
      config.vqgan.loss.adaptive_disc_weight = FLAGS.adaptive_disc_weight
      config.vqgan.train.batch_size = batch_size
      config.mesh.shape = (1, 1)
      with tempfile.TemporaryDirectory() as workdir:
        trainer = vqgan_trainer.VQGANTrainer(config, workdir, devices=jax.devices()[:1])
        state = trainer.initial_state()
        variables = {"params": state.params, "quantizer_state": state.quantizer_state}
        rng = np.random.default_rng(0)
        video_uint8 = rng.integers(0, 256, (batch_size, FLAGS.frames, resolution, resolution, 3),
                                   dtype=np.uint8)
        video = jax.numpy.asarray(video_uint8, jax.numpy.float32) / 127.5 - 1.0
        encode = jax.jit(lambda v, x: trainer.model.apply(v, x, method=VQGAN3D.encode))
        latent = encode(variables, video)
        decode = jax.jit(lambda v, z: trainer.model.apply(v, z, method=VQGAN3D.decode))
        shape = f"{FLAGS.frames}x{resolution}x{resolution}"
        for name, fn, args in (("encode", encode, (variables, video)),
                               ("decode", decode, (variables, latent))):
          flops = common.compiled_flops(fn, *args)
          seconds, _ = common.time_call(fn, *args, repeats=FLAGS.repeats)
          rows.append(_row(name, shape, batch_size, conv_impl, seconds, flops, matmul))
        if FLAGS.train:
          batch = {"video": video_uint8, "label": np.zeros(batch_size, np.int32),
                   "fps": np.full(batch_size, 25.0, np.float32)}
          sharded = sharding.shard_batch(batch, trainer.mesh)
          step = trainer.train_step
          flops = float((step.lower(state, sharded, trainer.lpips_params).compile()
                         .cost_analysis() or {}).get("flops", 0.0))
          holder = [state]

          def run_step():
            holder[0], metrics = step(holder[0], sharded, trainer.lpips_params)
            return metrics

          seconds, _ = common.time_call(run_step, repeats=FLAGS.repeats)
          rows.append(_row("train step", shape, batch_size, conv_impl, seconds, flops, matmul))
        trainer.checkpointer.close()
  memory = common.peak_memory_gib()
  print(f"Device: {common.device_description()}; float32 matmul {matmul:.0f} GFLOP/s; "
        f"peak device memory: {'n/a' if memory is None else f'{memory:.2f} GiB'}")
  common.print_table(
      f"3D VQGAN ({FLAGS.config})",
      ["op", "clip", "batch", "conv", "median ms", "clips/s", "steps/s", "GFLOP/s", "% matmul"],
      rows)


def _row(name, shape, batch_size, conv_impl, seconds, flops, matmul):
  gflops = flops / seconds / 1e9
  return [name, shape, str(batch_size), conv_impl, f"{seconds * 1e3:.1f}",
          f"{batch_size / seconds:.2f}", f"{1 / seconds:.2f}" if name == "train step" else "",
          f"{gflops:.1f}", f"{100 * gflops / matmul:.0f}%"]


if __name__ == "__main__":
  common.run_main(main)
