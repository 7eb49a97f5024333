r"""Entry point: ``python -m vqvdm_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]``.

Config fields are overridden on the command line, e.g. ``--config.vqgan.train.batch_size=16``.
The first run on a workdir records its config there (``DIR/config.json``); later runs may leave
``--config`` out and get the recorded one, and a run whose model fields differ from the record
stops before touching the workdir.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vqvdm_jax import config as config_lib
from vqvdm_jax import runtime

MODES = ("train", "train_vqgan", "evaluate_vqgan", "train_diffusion", "sample", "evaluate")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and outputs.")
flags.DEFINE_enum("mode", "train", MODES,
                  "train: both stages then samples, resuming what the workdir already holds.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs not on a TPU pod or SLURM.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["workdir"])

RECORDED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded_config.py")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with ``--config`` defaulting to the workdir's recorded config."""
  given = any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:])
  workdir = next((arg.partition("=")[2] for arg in argv[1:] if arg.startswith("--workdir=")),
                 None)
  if not given and workdir:
    argv = [argv[0], f"--config={RECORDED_CONFIG}:{workdir}", *argv[1:]]
  try:
    return FLAGS(argv)
  except flags.Error as error:
    sys.stderr.write(f"{error}\nPass --help for the flags.\n")
    sys.exit(1)


def run(mode: str, config, workdir: str) -> None:
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r} is not one of {MODES}.")
  config_lib.validate(config)
  from vqvdm_jax import workdir as workdir_lib
  # Before anything is restored or written: a model field that differs from the workdir's
  # record would otherwise end in a shape error deep inside Orbax.
  workdir_lib.check_or_record_config(config, workdir, write=False)
  if mode != "sample" and config.data.name != "synthetic":
    from vqvdm_jax.data import real
    try:  # before any compilation: a missing dataset is the first thing to hear about.
      real.check_prepared(config.data)
    except real.DatasetNotPreparedError as error:
      raise config_lib.ConfigError(str(error)) from error
  runtime.configure_jax()
  # Imports are per mode so `--help` and config errors answer before JAX compiles anything.
  if mode in ("train", "train_vqgan"):
    from vqvdm_jax.training.vqgan_trainer import train_vqgan
    logging.info("Stage 1 of 2: the 3D VQGAN tokenizer.")
    train_vqgan(config, workdir)
  if mode == "evaluate_vqgan":
    from vqvdm_jax.evaluation.evaluate_vqgan import evaluate_vqgan
    evaluate_vqgan(config, workdir)
  if mode in ("train", "train_diffusion"):
    from vqvdm_jax.training.diffusion_trainer import train_diffusion
    logging.info("Stage 2 of 2: latent diffusion with the 3D U-Net.")
    train_diffusion(config, workdir)
  if mode in ("train", "sample"):
    from vqvdm_jax.inference.model import load
    load(workdir, config=config).write_samples(workdir_lib.samples_dir(workdir))
  if mode == "evaluate":
    from vqvdm_jax.evaluation.evaluate import evaluate
    evaluate(config, workdir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)  # the project's progress; --verbosity=1 adds libraries'
  runtime.quiet_library_logs()
  try:
    config_lib.validate(FLAGS.config)  # before the distributed runtime waits for its peers
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except config_lib.ConfigError as error:
    raise app.UsageError(str(error)) from error
  except runtime.Preempted as preempted:
    logging.warning("%s", preempted)  # a clean stop: the checkpoint is written


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
