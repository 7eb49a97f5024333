r"""Evaluation cost: I3D clips/s and the wall time of a 2,048-sample FVD (and KVD) on one machine.

Rows 1..k: the I3D feature network (16x224x224 after resizing, HIGHEST precision, the protocol of
``vqvdm_jax/evaluation/i3d.py``) on random uint8 clips of ``--frames`` x ``--resolution``², per
batch size: median ms per batch, clips/s, GFLOP/s and its share of this run's matmul rate.

Then the FVD itself: I3D features of ``--clips`` real and ``--clips`` generated clips through the
batched, sharded extractor that ``--mode=evaluate`` uses, plus FVD and KVD on the features. With
``--clips`` below ``--num_samples`` (a CPU-sized run) the feature time is extrapolated linearly
to ``--num_samples`` per set, and the metric time is measured on random features of the full size.
Generating the samples is not included (see benchmarks/sampling.py).

  python benchmarks/evaluation.py                                        # GPU/TPU: all 2,048
  python benchmarks/evaluation.py --batch_sizes=1,4 --clips=8            # a 2-core CPU
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402
import ml_collections  # noqa: E402

from vqvdm_jax import runtime  # noqa: E402
from vqvdm_jax.evaluation import features, i3d, metrics  # noqa: E402
from vqvdm_jax import sharding  # noqa: E402

flags.DEFINE_list("batch_sizes", ["1", "16", "64"], "I3D batch sizes to time.")
flags.DEFINE_integer("num_samples", 2048, "Clips per set of the FVD (the paper: 2,048).")
flags.DEFINE_integer("clips", 0, "Clips per set actually run (0: --num_samples).")
flags.DEFINE_integer("fvd_batch_size", 0, "Extractor batch of the FVD run (0: the largest row).")
flags.DEFINE_integer("frames", 16, "Frames of the input clips.")
flags.DEFINE_integer("resolution", 128, "Side of the input clips (resized to 224 by I3D).")
flags.DEFINE_integer("repeats", 3, "Timed calls per row (median).")
FLAGS = flags.FLAGS


def hlo_flops(fn, *args) -> float:
  """FLOPs of one call counted on the program before backend compilation.

  The compiled count misses convolutions that GPUs hand to cuDNN as custom calls.
  """
  analysis = jax.jit(fn).lower(*args).cost_analysis() or {}
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float(analysis.get("flops", 0.0))


def random_clips(rng: np.random.Generator, count: int) -> np.ndarray:
  shape = (count, FLAGS.frames, FLAGS.resolution, FLAGS.resolution, 3)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def feature_time(extractor: features.FeatureExtractor, rng: np.random.Generator,
                 clips: int) -> tuple[float, np.ndarray]:
  """Seconds to extract features of ``clips`` clips (data made beforehand, chunk by chunk)."""
  chunks = [random_clips(rng, min(extractor.batch_size, clips - start))
            for start in range(0, clips, extractor.batch_size)]
  start = time.perf_counter()
  out = np.concatenate([extractor(chunk) for chunk in chunks])
  return time.perf_counter() - start, out


def main(argv):
  del argv
  runtime.configure_jax()
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"shape": (-1,), "axes": ("data",)}))
  rng = np.random.default_rng(0)
  matmul = common.matmul_gflops()
  variables = i3d.load_variables()
  rows = []
  for batch_size in (int(b) for b in FLAGS.batch_sizes):
    extractor = features.FeatureExtractor(i3d.logits, variables, mesh, batch_size)
    batch = random_clips(rng, extractor.batch_size)
    flops = hlo_flops(i3d.logits, variables, batch)
    seconds, _ = common.time_call(extractor, batch, repeats=FLAGS.repeats)
    gflops = flops / seconds / 1e9
    rows.append([f"I3D logits, {FLAGS.frames}x{FLAGS.resolution}² -> 16x224²",
                 str(extractor.batch_size), f"{seconds * 1e3:.0f}",
                 f"{extractor.batch_size / seconds:.2f}", f"{gflops:.0f}",
                 f"{100 * gflops / matmul:.0f}%"])
  common.print_table(f"I3D on {common.device_description()} (float32 matmul at the default "
                     f"precision: {matmul:.0f} GFLOP/s; I3D runs at HIGHEST)",
                     ["op", "batch", "median ms", "clips/s", "GFLOP/s", "% matmul"], rows)

  full = FLAGS.num_samples
  clips = FLAGS.clips or full
  fvd_batch = FLAGS.fvd_batch_size or max(int(b) for b in FLAGS.batch_sizes)
  extractor = features.FeatureExtractor(i3d.logits, variables, mesh, fvd_batch)
  extractor(random_clips(rng, 1))  # compile outside the timing
  real_seconds, real = feature_time(extractor, rng, clips)
  fake_seconds, fake = feature_time(extractor, rng, clips)
  if clips < full:  # the metrics' cost at the full size, on features of that size
    real = np.concatenate([real, rng.normal(size=(full - clips, real.shape[1]))])
    fake = np.concatenate([fake, rng.normal(size=(full - clips, fake.shape[1]))])
  start = time.perf_counter()
  metrics.frechet_video_distance(real, fake)
  fvd_seconds = time.perf_counter() - start
  start = time.perf_counter()
  metrics.kernel_distance(real, fake)
  kvd_seconds = time.perf_counter() - start
  scale = full / clips
  per_set = fake_seconds * scale
  cold = (real_seconds + fake_seconds) * scale + fvd_seconds + kvd_seconds
  note = "measured" if clips == full else f"extrapolated from {clips} clips per set"
  common.print_table(
      f"A {full}-sample FVD + KVD ({note}; batch {extractor.batch_size}; generation excluded)",
      ["part", "seconds"],
      [[f"I3D features of {full} generated clips", f"{per_set:.1f}"],
       [f"I3D features of {full} real clips (once; then cached)",
        f"{real_seconds * scale:.1f}"],
       [f"Frechet distance ({full} x 400, float64)", f"{fvd_seconds:.2f}"],
       [f"KVD ({full} x {full} kernels, float64)", f"{kvd_seconds:.2f}"],
       ["FVD + KVD, reference cached", f"{per_set + fvd_seconds + kvd_seconds:.1f}"],
       ["FVD + KVD, cold (reference computed too)", f"{cold:.1f}"]])


if __name__ == "__main__":
  common.run_main(main)
