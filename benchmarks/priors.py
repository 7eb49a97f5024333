r"""The three stage-2 priors side by side on one tokenizer, for one wall-clock training budget.

Stage 1 trains once (``--config``, the demo by default; skipped when ``--workdir`` already holds
its last checkpoint). Then each prior of ``--priors`` (latent diffusion, the autoregressive and
the masked transformer) trains on that tokenizer for ``--budget_s`` seconds of training steps: a
warm-up of ``--warmup_steps`` steps measures its steps/s (the loop's own clips/s, after the
compiled first step) and the run resumes to ``num_steps`` = budget x steps/s. Compiling and the
code and latent caches stay outside the budget (the table's "train s" is the whole wall time).

Each prior is then measured with its config's sampling settings: the time to sample 8 videos
(compiled, median of ``--repeats``), the frame-classifier probe on ``--probe_videos`` samples
(classes in turn; ``benchmarks/sample_classes.py``) and FVD / KVD of ``--num_fvd`` samples
against as many training clips (``--mode=evaluate``'s code).

Each prior's row is kept in ``DIR/priors_benchmark/<prior>.json`` and its samples' grid in
``<prior>_samples.gif`` beside it; the table shows every row there, so priors may be run one
invocation at a time. A prior's stage-2 folder must not exist yet (each row is a fresh run).

  python benchmarks/priors.py --workdir=/tmp/priors --budget_s=270
  python benchmarks/priors.py --workdir=/tmp/priors --priors=masked --budget_s=270  # one more
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common  # noqa: E402

from vqvdm_jax import checkpointing, runtime, video_io  # noqa: E402
from vqvdm_jax import workdir as workdir_lib  # noqa: E402
from vqvdm_jax.data import latents as latents_lib  # noqa: E402
from vqvdm_jax.data import tokens as tokens_lib  # noqa: E402
from vqvdm_jax.evaluation import evaluate, probe  # noqa: E402
from vqvdm_jax.inference.model import load  # noqa: E402
from vqvdm_jax.inference.tokenizer import load_tokenizer  # noqa: E402
from vqvdm_jax.training.diffusion_trainer import train_diffusion  # noqa: E402
from vqvdm_jax.training.token_trainer import train_prior  # noqa: E402
from vqvdm_jax.training.vqgan_trainer import train_vqgan  # noqa: E402

PRIORS = ("diffusion", "autoregressive", "masked")
ROOT = Path(__file__).resolve().parents[1]

flags.DEFINE_string("config", str(ROOT / "configs/demo.py"), "Config file (stage 1 and priors).")
flags.DEFINE_string("workdir", None, "Workdir: trained stage 1 is reused, else trained.",
                    required=True)
flags.DEFINE_list("priors", list(PRIORS), f"Priors to train and measure, of {PRIORS}.")
flags.DEFINE_float("budget_s", 270.0, "Wall-clock training budget of each prior, in seconds.")
flags.DEFINE_integer("warmup_steps", 40, "Steps that measure a prior's steps/s.")
flags.DEFINE_integer("num_videos", 8, "Videos whose sampling is timed.")
flags.DEFINE_integer("repeats", 3, "Timed sampling calls (median), after one compiling call.")
flags.DEFINE_integer("probe_videos", 64, "Samples classified by the probe (classes in turn).")
flags.DEFINE_integer("probe_clips", 1024, "Training clips reconstructed for the probe.")
flags.DEFINE_integer("probe_steps", 600, "Probe training steps.")
flags.DEFINE_integer("num_fvd", 64, "Generated and reference clips of FVD / KVD (0: skip; I3D "
                     "costs ~2 s a clip on 2 CPU cores).")
flags.DEFINE_integer("seed", 0, "Sampling seed (probe samples; FVD uses evaluation.seed).")
FLAGS = flags.FLAGS


def prior_config(prior: str):
  config = common.load_config(FLAGS.config)
  config.stage2 = prior  # configs/demo.py's variants change this field alone
  if FLAGS.num_fvd:
    config.evaluation.num_samples_fvd = FLAGS.num_fvd
  config.evaluation.reference_dir = str(Path(FLAGS.workdir) / "reference_features")
  return config


def train_stage2(config) -> None:
  """``--mode=train_prior``: the prior ``config.stage2`` names."""
  (train_diffusion if config.stage2 == "diffusion" else train_prior)(config, FLAGS.workdir)


def train_section(config):
  return config.diffusion.train if config.stage2 == "diffusion" else config.transformer.train


def build_cache(config) -> None:
  """The prior's training data (latents or code indices), before its budget starts."""
  tokenizer = load_tokenizer(FLAGS.workdir, config=config)
  if config.stage2 == "diffusion":
    latents_lib.build_or_load(config, FLAGS.workdir, tokenizer.step,
                              tokenizer.encode_for_diffusion)
  else:
    tokens_lib.build_or_load(config, FLAGS.workdir, tokenizer.step, tokenizer.encode_to_indices)


def steps_per_second(config) -> float:
  """The last logged window's steps/s of the prior's run (the loop's clips/s, read back from
  its TensorBoard summaries; the first window starts after the compiled first step)."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  events = event_accumulator.EventAccumulator(
      str(workdir_lib.stage2_dir(FLAGS.workdir, config.stage2) / "summaries"),
      size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  rates = [float(tensor_util.make_ndarray(event.tensor_proto))
           for event in events.Tensors("clips_per_second")]
  return rates[-1] / train_section(config).batch_size


def train_for_budget(config) -> dict:
  """Warm-up run, then a resumed run to ``--budget_s`` x the measured steps/s steps.

  The budget is the time of the training steps: compiling (twice, warm-up and resumed run) and
  restoring are left out, so a prior with a slow compile is not charged for it; ``train_s``
  records the whole wall time. The learning rate's warm-up (``optim.warmup_steps``) does not
  depend on ``num_steps``, so a warm-up shorter than it trains exactly as the first steps of
  the full run do.
  """
  train = train_section(config)
  # Checkpoints at the end of each run only: saving is no part of a prior's cost.
  train.num_steps = train.checkpoint_every = FLAGS.warmup_steps
  train.log_every = max(1, FLAGS.warmup_steps // 2)
  start = time.perf_counter()
  train_stage2(config)
  rate = steps_per_second(config)
  num_steps = int(rate * FLAGS.budget_s)
  if num_steps > FLAGS.warmup_steps:
    train.num_steps = train.checkpoint_every = num_steps
    train.log_every = max(1, min(100, num_steps // 10))
    train_stage2(config)
  return {"steps": train.num_steps, "train_s": time.perf_counter() - start,
          "steps_per_s": rate}


def measure_prior(prior: str, class_probe: tuple, out_dir: Path) -> dict:
  """Trains ``prior`` for the budget and measures it; ``class_probe``: what
  :func:`probe.reconstruction_probe` returns for the tokenizer."""
  config = prior_config(prior)
  stage_dir = workdir_lib.stage2_dir(FLAGS.workdir, prior)
  if stage_dir.exists():
    raise app.UsageError(f"{stage_dir} exists: each row is a fresh run; remove it first.")
  build_cache(config)
  row = {"prior": prior, "date": datetime.date.today().isoformat(),
         "load_1min": os.getloadavg()[0], **train_for_budget(config)}

  model = load(FLAGS.workdir, config=config)
  row["sampling"] = model.sampling_settings()
  num_classes = config.data.num_classes
  labels = np.arange(FLAGS.num_videos) % num_classes
  start = time.perf_counter()
  model.sample(labels=labels, seed=FLAGS.seed)  # compiles
  row["sample_first_s"] = time.perf_counter() - start
  times = []
  for _ in range(FLAGS.repeats):
    start = time.perf_counter()
    model.sample(labels=labels, seed=FLAGS.seed)
    times.append(time.perf_counter() - start)
  row["sample_s"] = statistics.median(times)

  probe_params, held_out, held_out_labels = class_probe
  ceiling = probe.class_scores(probe_params, held_out, held_out_labels, num_classes)
  probe_labels = np.arange(FLAGS.probe_videos) % num_classes
  videos = model.sample(labels=probe_labels, seed=FLAGS.seed)
  scores = probe.class_scores(probe_params, videos, probe_labels, num_classes)
  grid = video_io.video_grid(videos[:4 * num_classes], columns=num_classes)
  video_io.write_gif(out_dir / f"{prior}_samples.gif", grid, config.diffusion.sample.fps)
  row.update(probe_ceiling=ceiling["accuracy"], accuracy=scores["accuracy"],
             visible=scores["visible"], correct_and_visible=scores["correct_and_visible"],
             per_class_accuracy=scores["per_class_accuracy"].tolist())

  row.update(fvd=None, kvd=None)
  if FLAGS.num_fvd:
    results = evaluate.evaluate(config, FLAGS.workdir, out_dir=out_dir / f"{prior}_eval")
    row.update(fvd=results["fvd"], kvd=results["kvd"])
  return row


def table_rows(rows: list[dict]) -> list[list[str]]:
  out = []
  for row in sorted(rows, key=lambda row: PRIORS.index(row["prior"])):
    sampling = ", ".join(f"{name} {value}" for name, value in row["sampling"].items()
                         if name != "prior")
    out.append([row["prior"], f"{row['steps']} ({row['steps_per_s']:.2f}/s)",
                f"{row['train_s']:.0f}", f"{row['sample_s']:.2f} ({row['sample_first_s']:.1f})",
                f"{row['accuracy']:.2f} (ceiling {row['probe_ceiling']:.2f})",
                f"{row['visible']:.2f}", f"{row['correct_and_visible']:.2f}",
                "-" if row["fvd"] is None else f"{row['fvd']:.1f}",
                "-" if row["kvd"] is None else f"{row['kvd']:.4f}", sampling,
                f"{row['date']}, load {row['load_1min']:.1f}"])
  return out


def main(argv):
  del argv
  runtime.configure_jax()
  unknown = set(FLAGS.priors) - set(PRIORS)
  if unknown:
    raise app.UsageError(f"--priors: unknown {sorted(unknown)}; choose from {PRIORS}.")
  matmul = common.matmul_gflops()
  config = prior_config("diffusion")
  stage1 = checkpointing.checkpoint_steps(workdir_lib.vqgan_dir(FLAGS.workdir) / "checkpoints")
  if not stage1 or stage1[-1] < config.vqgan.train.num_steps:
    logging.info("Stage 1: training the tokenizer in %s.", FLAGS.workdir)
    train_vqgan(config, FLAGS.workdir)
  # One probe for every prior: the tokenizer is theirs in common.
  class_probe = probe.reconstruction_probe(load_tokenizer(FLAGS.workdir, config=config), config,
                                           FLAGS.probe_clips, FLAGS.probe_steps)
  out_dir = Path(FLAGS.workdir) / "priors_benchmark"
  out_dir.mkdir(parents=True, exist_ok=True)
  for prior in FLAGS.priors:
    row = measure_prior(prior, class_probe, out_dir)
    row["matmul_gflops"] = matmul
    (out_dir / f"{prior}.json").write_text(json.dumps(row, indent=2) + "\n")
    print(f"{prior}: {row}", flush=True)

  rows = [json.loads(path.read_text()) for path in out_dir.glob("*.json")
          if path.stem in PRIORS]
  tokenizer = config.vqgan
  print(f"\nDevice: {common.device_description()}; float32 matmul {matmul:.0f} GFLOP/s, "
        f"load (1 min) {os.getloadavg()[0]:.1f} now. Config {FLAGS.config} (seed "
        f"{config.seed}), tokenizer step {config.vqgan.train.num_steps} "
        f"({tokenizer.quantizer.kind}, {tokenizer.quantizer.codebook_size} codes); budget "
        f"{FLAGS.budget_s:.0f} s per prior; sampling seed {FLAGS.seed}, probe on "
        f"{FLAGS.probe_videos} samples, FVD/KVD on {FLAGS.num_fvd} + {FLAGS.num_fvd} clips "
        f"(evaluation.seed {config.evaluation.seed}).")
  common.print_table(
      "Stage-2 priors on one tokenizer, equal training time",
      ["prior", "steps (steps/s)", "train s", f"sample {FLAGS.num_videos} s (first call)",
       "probe accuracy", "sprite visible", "correct and visible", "FVD", "KVD",
       "sampling", "measured"], table_rows(rows))


if __name__ == "__main__":
  common.run_main(main)
