r"""Entry point: ``python -m vqvdm_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]``.

Config fields are overridden on the command line, e.g. ``--config.vqgan.train.batch_size=16``.
The first run on a workdir records its config there (``DIR/config.json``); later runs may leave
``--config`` out and get the recorded one, and a run whose model fields differ from the record
stops before touching the workdir.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from vqvdm_jax import config as config_lib
from vqvdm_jax import runtime

MODES = ("train", "train_vqgan", "evaluate_vqgan", "train_diffusion", "train_prior", "sample",
         "evaluate")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and outputs.")
flags.DEFINE_enum("mode", "train", MODES,
                  "train: both stages then samples, resuming what the workdir already holds; "
                  "train_prior: stage 2 alone, the prior config.stage2 selects (diffusion, "
                  "autoregressive or masked).")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0, for multi-process runs not on a TPU pod or SLURM.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_string("output_dir", None,
                    "sample / evaluate / evaluate_vqgan: where to write (default: a new "
                    "DIR/samples/NNN, DIR/eval/NNN or DIR/vqgan/eval/NNN, so that no invocation "
                    "overwrites another's outputs).")
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
  except (flags.Error, AttributeError, OSError, ValueError, TypeError) as error:
    # ml_collections raises these while loading --config and applying --config.* overrides.
    sys.stderr.write(f"Error: {_flag_error_message(error, argv)}\n")
    sys.exit(2)


def _flag_error_message(error: Exception, argv: list[str]) -> str:
  message = str(error).strip()
  if isinstance(error, AttributeError):  # an override naming a field the config lacks
    field = message.strip("\"'")
    named = [arg.partition("=")[0] for arg in argv if arg.startswith("--config.")
             and f".{field}" in arg.partition("=")[0]]
    return (f"{named[0] if named else 'a --config.* override'}: the config has no field "
            f"{field!r}; see README (Running) or the config file for the fields.")
  if "Failed loading config file" in message or "No such file" in message:
    return (f"could not load the config file ({message.splitlines()[-1].strip()}); pass "
            f"--config=configs/NAME.py[:VARIANT].")
  message = message.splitlines()[-1] if len(message) > 400 else message
  return message.removeprefix("ValueError: ")


def run(mode: str, config, workdir: str, output_dir: str | None = None) -> None:
  start = time.monotonic()  # the time budget counts from here
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r} is not one of {MODES}.")
  config_lib.validate(config)
  if mode == "train_diffusion" and config.stage2 != "diffusion":
    raise config_lib.ConfigError(
        f"--mode=train_diffusion trains the diffusion prior, but config.stage2="
        f"{config.stage2!r}; use --mode=train_prior to train the {config.stage2} prior.")
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
  if mode in ("sample", "evaluate", "evaluate_vqgan", "train_diffusion", "train_prior"):
    workdir_lib.require_checkpoints(workdir, "vqgan")
  if mode in ("sample", "evaluate"):
    workdir_lib.require_checkpoints(workdir, config.stage2)
  # Where this invocation writes, checked before anything compiles or samples.
  samples_dir = output_dir if mode == "sample" and output_dir else None
  if mode in ("train", "sample") and samples_dir is None:
    samples_dir = workdir_lib.new_output_dir(workdir_lib.samples_dir(workdir))
  eval_dir = None
  if mode in ("evaluate", "evaluate_vqgan"):
    parent = workdir_lib.eval_dir if mode == "evaluate" else workdir_lib.vqgan_eval_dir
    eval_dir = output_dir or workdir_lib.new_output_dir(parent(workdir))
  for directory in (workdir if mode.startswith("train") else None, samples_dir, eval_dir):
    if directory is not None:
      workdir_lib.check_writable(directory)
  runtime.configure_jax()
  stage1_deadline = stage2_deadline = None
  if mode == "train" and config.run.time_budget_minutes:
    import jax
    if jax.process_count() > 1:
      raise config_lib.ConfigError(
          f"run.time_budget_minutes={config.run.time_budget_minutes:g} needs one process (each "
          f"would stop at its own step); this run has {jax.process_count()}. Set it to 0 and "
          f"choose the stages' num_steps instead.")
    from vqvdm_jax.training import loop
    stage1_deadline, stage2_deadline = loop.stage_deadlines(
        start, config.run.time_budget_minutes, config.run.stage1_time_share)
    logging.info("Time budget: %g minutes for both stages and the samples; a stage that would "
                 "run past its share stops early (--config.run.time_budget_minutes=0: no "
                 "budget).", config.run.time_budget_minutes)
  # Imports are per mode so `--help` and config errors answer before JAX compiles anything.
  if mode in ("train", "train_vqgan"):
    from vqvdm_jax.training.vqgan_trainer import train_vqgan
    logging.info("Stage 1 of 2: the 3D VQGAN tokenizer.")
    train_vqgan(config, workdir, deadline=stage1_deadline)
  if mode == "evaluate_vqgan":
    from vqvdm_jax.evaluation.evaluate_vqgan import evaluate_vqgan
    evaluate_vqgan(config, workdir, out_dir=eval_dir)
  if mode in ("train", "train_diffusion", "train_prior") and config.stage2 == "diffusion":
    from vqvdm_jax.training.diffusion_trainer import train_diffusion
    logging.info("Stage 2 of 2: latent diffusion with the 3D U-Net.")
    train_diffusion(config, workdir, deadline=stage2_deadline)
  elif mode in ("train", "train_prior"):
    from vqvdm_jax.training.token_trainer import train_prior
    logging.info("Stage 2 of 2: the %s transformer over the tokenizer's codes.", config.stage2)
    train_prior(config, workdir, deadline=stage2_deadline)
  if mode in ("train", "sample"):
    from vqvdm_jax.inference.model import load
    load(workdir, config=config).write_samples(samples_dir)
  if mode == "evaluate":
    from vqvdm_jax.evaluation.evaluate import evaluate
    evaluate(config, workdir, out_dir=eval_dir)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)  # the project's progress; --verbosity=1 adds libraries'
  runtime.quiet_library_logs()
  try:
    config = FLAGS.config
    config.get("seed")  # a config file that failed to load raises what went wrong here
  except (OSError, AttributeError, ValueError, TypeError) as error:
    sys.stderr.write(f"Error: {_flag_error_message(error, sys.argv)}\n")
    sys.exit(2)
  try:
    config_lib.validate(config)  # before the distributed runtime waits for its peers
    runtime.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                   FLAGS.process_id)
    run(FLAGS.mode, config, FLAGS.workdir, FLAGS.output_dir)
  except config_lib.UserError as error:  # what the user can fix: the message, no traceback
    sys.stderr.write(f"Error: {error}\n")
    sys.exit(2)
  except runtime.Preempted as preempted:
    logging.warning("%s", preempted)  # a clean stop: the checkpoint is written


if __name__ == "__main__":
  runtime.restart_with_huge_page_malloc()
  app.run(main, flags_parser=parse_flags)
