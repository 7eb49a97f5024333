r"""Entry point: ``python -m vqvdm_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]``.

Config fields are overridden on the command line, e.g. ``--config.vqgan.train.batch_size=16``.
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from vqvdm_jax import config as config_lib
from vqvdm_jax import runtime

MODES = ("train_vqgan", "evaluate_vqgan")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and outputs.")
flags.DEFINE_enum("mode", "train_vqgan", MODES, "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def run(mode: str, config, workdir: str) -> None:
  config_lib.validate(config)
  runtime.configure_jax()
  if mode == "train_vqgan":
    from vqvdm_jax.training.vqgan_trainer import train_vqgan
    train_vqgan(config, workdir)
  elif mode == "evaluate_vqgan":
    from vqvdm_jax.evaluation.evaluate_vqgan import evaluate_vqgan
    evaluate_vqgan(config, workdir)
  else:
    raise ValueError(f"--mode={mode!r} is not one of {MODES}.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    run(FLAGS.mode, FLAGS.config, FLAGS.workdir)
  except config_lib.ConfigError as error:
    raise app.UsageError(str(error)) from error


if __name__ == "__main__":
  app.run(main)
