r"""Train on a Cloud TPU VM or pod slice: create it, put the code on every worker, install, run.

  python launch/tpu_vm.py --tpu=vqvdm-v4 --zone=us-central2-b --accelerator-type=v4-32 \
      --config=configs/ucf101.py --workdir=gs://my-bucket/vqvdm/ucf101 [--dry-run] \
      [-- --mode=train_vqgan]

Every step is a ``gcloud compute tpus tpu-vm`` command; ``--dry-run`` prints them. The code is the
local checkout's committed ``HEAD`` (``git archive``), or a ``git clone`` of ``--repo-url`` on each
worker. Training runs ``python3 -m vqvdm_jax.main`` on all workers at once (``--worker=all``);
on a pod slice JAX finds its peers by itself. The workdir is on Cloud Storage because a pod's
workers share no disk and a preempted VM loses its own; running the script again with
``--skip-create`` resumes from the workdir's latest checkpoint.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import launch_common as common

# Cloud TPU's software version for JAX, by TPU generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {"v6e": "v2-alpha-tpuv6e", "v5p": "v2-alpha-tpuv5",
                    "v5litepod": "v2-alpha-tpuv5-lite"}
OLDER_RUNTIME_VERSION = "tpu-ubuntu2204-base"  # v4 and older
ACCELERATOR_TYPE = re.compile(r"^(v\d[a-z0-9]*)-(\d+)$")
REMOTE_DIR = "~/vqvdm_jax"
REMOTE_ARCHIVE = "vqvdm_jax.tar.gz"
REMOTE_LOG = "~/vqvdm_jax.log"


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/tpu_vm.py", epilog=common.EPILOG,
      description="Train vqvdm_jax on a Cloud TPU VM or pod slice (all workers).")
  common.add_common_arguments(
      parser, "gs://BUCKET/PATH for checkpoints, summaries and samples (shared by all workers)")
  parser.add_argument("--tpu", required=True, help="name of the TPU VM or pod slice")
  parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
  parser.add_argument("--accelerator-type", default="v4-8",
                      help="e.g. v4-8 (one host), v4-32 (a pod slice), v5litepod-16, v6e-8")
  parser.add_argument("--version", help="TPU software version (default: the one Cloud TPU "
                      "recommends for JAX on the accelerator's generation)")
  parser.add_argument("--spot", action="store_true", help="create a Spot (preemptible) TPU")
  parser.add_argument("--skip-create", action="store_true",
                      help="the TPU exists already (e.g. to resume after an interruption)")
  parser.add_argument("--repo-url", help="git clone this repository on every worker instead "
                      "of copying the local checkout's HEAD")
  parser.add_argument("--branch", help="with --repo-url: the branch or tag to clone")
  parser.add_argument("--detach", action="store_true",
                      help=f"start training in the background (log in {REMOTE_LOG} on each "
                      "worker) so it outlives this terminal")
  return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  parser = make_parser()
  args, main_flags = common.parse_arguments(parser, argv)
  common.check_gcs_workdir(parser, args.workdir,
                           "a pod's workers share no disk, and a deleted TPU VM loses its own")
  match = ACCELERATOR_TYPE.match(args.accelerator_type)
  if not match:
    parser.error(f"--accelerator-type={args.accelerator_type!r} is not a TPU type such as "
                 "v4-8, v4-32, v5litepod-16 or v6e-8")
  if args.version is None:
    args.version = RUNTIME_VERSIONS.get(match.group(1), OLDER_RUNTIME_VERSION)
  if args.branch and not args.repo_url:
    parser.error("--branch needs --repo-url (without it the local checkout's HEAD is copied)")
  # The config is read on the workers, from the copied checkout: it must be one of its files.
  common.check_config(parser, args.config, None if args.repo_url else common.REPO_ROOT)
  return args, main_flags


def gcloud_tpu(verb: str, *arguments: str, args: argparse.Namespace,
               all_workers: bool = False) -> list[str]:
  """``gcloud compute tpus tpu-vm VERB ARGUMENTS --zone=... [--project=...] [--worker=all]``."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb, *arguments, f"--zone={args.zone}"]
  if args.project:
    command.append(f"--project={args.project}")
  if all_workers:
    command.append("--worker=all")
  return command


def on_all_workers(shell_command: str, args: argparse.Namespace) -> list[str]:
  return gcloud_tpu("ssh", args.tpu, args=args, all_workers=True) + ["--command", shell_command]


def commands(args: argparse.Namespace, main_flags: Sequence[str]) -> list[list[str]]:
  """Every command, in order: create, copy or clone, install, train."""
  result = []
  if not args.skip_create:
    create = gcloud_tpu("create", args.tpu, f"--accelerator-type={args.accelerator_type}",
                        f"--version={args.version}", args=args)
    result.append(create + (["--spot"] if args.spot else []))
  if args.repo_url:
    branch = [f"--branch={args.branch}"] if args.branch else []
    fetch = (f"rm -rf {REMOTE_DIR} && "
             + shlex.join(["git", "clone", "--depth=1", *branch, args.repo_url]) + f" {REMOTE_DIR}")
  else:
    archive = str(Path(tempfile.gettempdir()) / f"vqvdm_jax_{args.tpu}.tar.gz")
    result.append(["git", "-C", str(common.REPO_ROOT), "archive", "--format=tar.gz",
                   f"--output={archive}", "HEAD"])
    result.append(gcloud_tpu("scp", archive, f"{args.tpu}:{REMOTE_ARCHIVE}", args=args,
                             all_workers=True))
    fetch = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
             f"tar -xzf {REMOTE_ARCHIVE} -C {REMOTE_DIR}")
  install = ('python3 -m pip install --quiet --upgrade pip && '
             'python3 -m pip install --quiet -e . "jax[tpu]"')
  result.append(on_all_workers(f"{fetch} && cd {REMOTE_DIR} && {install}", args))
  train = shlex.join(common.main_command("python3", args.config, args.workdir, main_flags))
  if args.detach:
    train = f"nohup {train} > {REMOTE_LOG} 2>&1 &"
  result.append(on_all_workers(f"cd {REMOTE_DIR} && {train}", args))
  return result


def main(argv: Sequence[str] | None = None) -> None:
  args, main_flags = parse_args(sys.argv[1:] if argv is None else argv)
  runner = common.Runner(args.dry_run)
  for command in commands(args, main_flags):
    runner.run(command)


if __name__ == "__main__":
  main()
