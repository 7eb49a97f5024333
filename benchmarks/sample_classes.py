r"""Is the conditioned class recognisable? Probe accuracy of a trained run's samples per guidance w.

A frame classifier (``vqvdm_jax.evaluation.probe``) is trained on the tokenizer's reconstructions
of ``--probe_clips`` training clips; its accuracy on held-out reconstructions is the ceiling for
anything that tokenizer decodes. A classifier must label an empty frame too, so beside it is the
share of clips with a visible sprite (``probe.foreground_visible``), and the share both
correctly labelled and visible. Then ``--num_videos`` samples (classes in turn) are drawn from
the run's stage-2 EMA weights at each guidance scale and classified.

  python benchmarks/sample_classes.py --config=configs/demo.py --workdir=/tmp/demo
  python benchmarks/sample_classes.py --config=configs/demo.py --workdir=/tmp/demo \
      --guidance=1,2,4,6 --num_videos=128
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

import vqvdm_jax  # noqa: E402
from vqvdm_jax import runtime  # noqa: E402
from vqvdm_jax.evaluation import probe  # noqa: E402

flags.DEFINE_string("config", None, "A config file; default: the one the workdir recorded.")
flags.DEFINE_string("workdir", None, "The run's workdir (both stages trained).", required=True)
flags.DEFINE_list("guidance", ["1", "2", "4"], "Guidance scales w to sample at.")
flags.DEFINE_integer("num_videos", 64, "Samples per guidance scale (classes in turn).")
flags.DEFINE_integer("probe_clips", 1024, "Training clips reconstructed for the probe.")
flags.DEFINE_integer("probe_steps", 600, "Probe training steps.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  runtime.configure_jax()
  model = vqvdm_jax.load(FLAGS.workdir,
                         config=common.load_config(FLAGS.config) if FLAGS.config else None)
  config, tokenizer = model.config, model.tokenizer
  if not config.diffusion.use_class:
    raise app.UsageError(f"{FLAGS.workdir} holds an unconditional model; nothing to classify.")
  num_classes = config.data.num_classes

  start = time.perf_counter()
  params, clips, labels = probe.reconstruction_probe(tokenizer, config, FLAGS.probe_clips,
                                                     FLAGS.probe_steps)

  def row(name: str, videos: np.ndarray, expected: np.ndarray) -> list[str]:
    scores = probe.class_scores(params, videos, expected, num_classes)
    return [name, str(len(videos)), f"{scores['accuracy']:.3f}",
            f"{scores['correct_and_visible']:.3f}", f"{scores['visible']:.3f}",
            " ".join(f"{a:.2f}" for a in scores["per_class_accuracy"]),
            " ".join(f"{v:.2f}" for v in scores["per_class_visible"])]

  rows = [row("held-out reconstructions (ceiling)", clips, labels)]
  print(" | ".join(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)

  sample = config.diffusion.sample
  sample_labels = (np.arange(FLAGS.num_videos) % num_classes).astype(np.int32)
  for guidance in FLAGS.guidance:
    start = time.perf_counter()
    videos = model.sample(labels=sample_labels, guidance_scale=float(guidance), seed=FLAGS.seed)
    rows.append(row(f"samples, w = {guidance}", videos, sample_labels))
    print(" | ".join(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)

  print(f"Device: {common.device_description()}; {FLAGS.workdir}: stage-2 step "
        f"{model.step}, tokenizer step {tokenizer.step}; {sample.sampler} "
        f"{sample.num_steps} steps; chance {1 / num_classes:.2f}")
  common.print_table("Probe accuracy of the conditioned class",
                     ["videos", "clips", "accuracy", "correct and visible", "sprite visible",
                      "per-class accuracy", "per-class visible"], rows)


if __name__ == "__main__":
  common.run_main(main)
