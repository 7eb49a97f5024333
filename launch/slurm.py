r"""Train on several GPU nodes under SLURM: one batch job, one JAX process per node.

  python launch/slurm.py --nodes=4 --gpus-per-node=8 --partition=gpu --time=24:00:00 \
      --config=configs/ucf101.py --workdir=/shared/vqvdm/ucf101 [--dry-run] [-- --mode=train]

The script writes an sbatch script and submits it (``--dry-run`` prints both as one shell
command). In the job, ``srun`` starts ``python -m vqvdm_jax.main`` once per node; the first node
hosts JAX's coordinator, and each process gets ``--coordinator_address``, ``--num_processes``
(SLURM_NTASKS) and ``--process_id`` (SLURM_PROCID). With ``--distributed=auto`` those flags are
left out and ``jax.distributed.initialize()`` reads the same values from SLURM's environment.
The job asks SLURM for SIGTERM two minutes before its time limit, so training can save a
checkpoint and stop; ``--requeue`` resubmits a preempted job, which resumes from the workdir.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import launch_common as common

TIME_LIMIT = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
JOB_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# Read by each task from its own environment (srun sets SLURM_PROCID per task), so they stay
# unexpanded in the batch script and are expanded by the task's shell.
DISTRIBUTED_FLAGS = ('--coordinator_address="$VQVDM_COORDINATOR"',
                     '--num_processes="$SLURM_NTASKS"', '--process_id="$SLURM_PROCID"')


def positive_int(text: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
  return int(text)


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/slurm.py", epilog=common.EPILOG,
      description="Submit a multi-node GPU training job of vqvdm_jax to SLURM.")
  common.add_common_arguments(parser, "absolute path on a filesystem every node shares, or a "
                              "gs:// path, for checkpoints, summaries and samples")
  parser.add_argument("--nodes", type=positive_int, required=True, help="number of nodes")
  parser.add_argument("--gpus-per-node", type=positive_int, default=8)
  parser.add_argument("--cpus-per-node", type=positive_int, default=16,
                      help="CPU cores for the node's process (input pipeline workers)")
  parser.add_argument("--time", default="24:00:00",
                      help="time limit, e.g. 24:00:00 or 2-00:00:00")
  parser.add_argument("--partition", help="SLURM partition")
  parser.add_argument("--account", help="SLURM account")
  parser.add_argument("--job-name", default="vqvdm_jax")
  parser.add_argument("--requeue", action="store_true",
                      help="let SLURM requeue the job after preemption (it resumes)")
  parser.add_argument("--repo-dir", default=str(common.REPO_ROOT),
                      help="this repository's checkout on the shared filesystem "
                      "(default: this one)")
  parser.add_argument("--python", default="python",
                      help="Python on the compute nodes with vqvdm_jax and jax[cuda12] "
                      "installed, e.g. /shared/venvs/vqvdm/bin/python")
  parser.add_argument("--port", type=positive_int, default=12321,
                      help="port of JAX's coordinator on the first node")
  parser.add_argument("--distributed", choices=("flags", "auto"), default="flags",
                      help="flags: pass coordinator, process count and id to vqvdm_jax.main; "
                      "auto: let jax.distributed.initialize() read SLURM's environment")
  return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = make_parser()
  args, main_flags = common.parse_arguments(parser, argv)
  if not (args.workdir.startswith("gs://") or Path(args.workdir).is_absolute()):
    parser.error(f"--workdir={args.workdir!r} must be an absolute path on a filesystem every "
                 "node shares (e.g. /shared/vqvdm/run1) or a gs:// path")
  if not TIME_LIMIT.match(args.time):
    parser.error(f"--time={args.time!r} is not a SLURM time limit such as 24:00:00, 90 or "
                 "2-00:00:00")
  if not JOB_NAME.match(args.job_name):
    parser.error(f"--job-name={args.job_name!r} may hold only letters, digits, '_', '.', '-'")
  if args.port > 65535:
    parser.error(f"--port={args.port} is not a TCP port (1-65535)")
  repo_dir = Path(args.repo_dir)
  if not (repo_dir / "vqvdm_jax" / "main.py").is_file():
    parser.error(f"--repo-dir={args.repo_dir!r} is not a vqvdm_jax checkout (no "
                 "vqvdm_jax/main.py in it)")
  common.check_config(parser, args.config, repo_dir)  # the job runs in --repo-dir
  return args, main_flags


def batch_script(args: argparse.Namespace, main_flags: Sequence[str]) -> str:
  """The sbatch script: resources, coordinator on the first node, one task per node."""
  directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
                f"--gpus-per-node={args.gpus_per_node}", f"--cpus-per-task={args.cpus_per_node}",
                f"--time={args.time}", "--signal=TERM@120"]
  directives += [f"--partition={args.partition}"] if args.partition else []
  directives += [f"--account={args.account}"] if args.account else []
  directives += ["--requeue"] if args.requeue else []
  train = shlex.join(common.main_command(args.python, args.config, args.workdir, main_flags))
  if args.distributed == "flags":
    train += " " + " ".join(DISTRIBUTED_FLAGS)
  lines = ["#!/bin/bash", *(f"#SBATCH {directive}" for directive in directives),
           "# One process per node drives all of the node's GPUs; SIGTERM (time limit or",
           "# preemption) reaches it through srun and exec.",
           "set -euo pipefail",
           f"cd {shlex.quote(args.repo_dir)}",
           # sed, not head: head would exit early and SIGPIPE scontrol, failing the pipe.
           'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"',
           f'export VQVDM_COORDINATOR="$head_node:{args.port}"',
           'srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
           f"  bash -c {shlex.quote('exec ' + train)}"]
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
  args, main_flags = parse_args(sys.argv[1:] if argv is None else argv)
  common.Runner(args.dry_run).run(["sbatch"], stdin_text=batch_script(args, main_flags))


if __name__ == "__main__":
  main()
