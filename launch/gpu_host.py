r"""Train on one host with several GPUs: one JAX process drives every GPU it is given.

  python launch/gpu_host.py --config=configs/ucf101.py --workdir=workdirs/ucf101 \
      [--gpus=0,1,2,3] [--install] [--dry-run] [-- --mode=train_diffusion]

The batch is split over the GPUs by the mesh (``config.mesh``); no distributed start-up is needed
on one host. ``--install`` first installs the package and JAX's CUDA 12 build into the Python
that runs training. Running the same command again resumes from the workdir.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import launch_common as common


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/gpu_host.py", epilog=common.EPILOG,
      description="Train vqvdm_jax on the GPUs of this host, in one process.")
  common.add_common_arguments(parser, "directory (or gs:// path) for checkpoints, summaries "
                              "and samples")
  parser.add_argument("--gpus", help="comma-separated GPU indices to use, e.g. 0,1,2,3 "
                      "(default: every GPU the process sees)")
  parser.add_argument("--python", default=sys.executable,
                      help="Python interpreter that runs training (default: this one)")
  parser.add_argument("--install", action="store_true",
                      help="pip install this checkout and jax[cuda12] into --python first")
  return parser


def parse_gpus(parser: argparse.ArgumentParser, gpus: str) -> str:
  indices = gpus.split(",")
  if not all(index.isdigit() for index in indices):
    parser.error(f"--gpus={gpus!r} must be comma-separated GPU indices such as 0,1,2,3")
  if len(set(indices)) != len(indices):
    parser.error(f"--gpus={gpus!r} names a GPU twice; list each GPU once")
  return ",".join(indices)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = make_parser()
  args, main_flags = common.parse_arguments(parser, argv)
  if not args.workdir.strip():
    parser.error("--workdir must not be empty")
  if args.gpus is not None:
    args.gpus = parse_gpus(parser, args.gpus)
  common.check_config(parser, args.config, Path.cwd())  # training reads it from here
  return args, main_flags


def main(argv: Sequence[str] | None = None) -> None:
  args, main_flags = parse_args(sys.argv[1:] if argv is None else argv)
  runner = common.Runner(args.dry_run)
  if args.install:
    runner.run([args.python, "-m", "pip", "install", "-e", str(common.REPO_ROOT),
                "jax[cuda12]"])
  env = {"CUDA_VISIBLE_DEVICES": args.gpus} if args.gpus is not None else None
  runner.run(common.main_command(args.python, args.config, args.workdir, main_flags), env=env)


if __name__ == "__main__":
  main()
