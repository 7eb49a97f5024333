"""What the three launch scripts share: argument checks, the training command, dry runs.

The launch scripts run on the user's own machine (a laptop, a cluster's login node), so they use
the standard library only: no JAX, no vqvdm_jax import.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = "vqvdm_jax.main"

EPILOG = ("Flags after a bare -- go to vqvdm_jax.main unchanged, e.g. "
          "-- --mode=train_vqgan --config.vqgan.train.batch_size=64")


def split_main_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """``[script args] -- [vqvdm_jax.main flags]`` -> the two lists."""
  argv = list(argv)
  if "--" not in argv:
    return argv, []
  split = argv.index("--")
  return argv[:split], argv[split + 1:]


def add_common_arguments(parser: argparse.ArgumentParser, workdir_help: str) -> None:
  parser.add_argument("--config", required=True,
                      help="config file, e.g. configs/demo.py or configs/ucf101.py:runlocal")
  parser.add_argument("--workdir", required=True, help=workdir_help)
  parser.add_argument("--dry-run", action="store_true",
                      help="print the exact commands instead of running them")


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]
                    ) -> tuple[argparse.Namespace, list[str]]:
  """The script's own arguments (checked by ``parser``) and the flags after ``--``, checked."""
  own_args, main_flags = split_main_flags(argv)
  args = parser.parse_args(own_args)
  check_main_flags(parser, main_flags)
  return args, main_flags


def check_main_flags(parser: argparse.ArgumentParser, main_flags: Sequence[str]) -> None:
  for flag in main_flags:
    if not flag.startswith("--"):
      parser.error(f"{flag!r} after -- is not a flag; vqvdm_jax.main takes flags such as "
                   "--mode=sample or --config.seed=1")
    if flag.split("=", 1)[0] in ("--config", "--workdir"):
      parser.error(f"give {flag.split('=', 1)[0]} before the --, as this script's own argument")


def check_config(parser: argparse.ArgumentParser, config: str, base: Path | None) -> None:
  """``config`` is ``FILE.py[:VARIANT]``; with ``base``, FILE must exist relative to it."""
  config_file = config.split(":", 1)[0]
  if not config_file.endswith(".py"):
    parser.error(f"--config={config!r} must name a config file such as configs/demo.py "
                 "(optionally with a variant: configs/ucf101.py:runlocal)")
  if base is not None and not (base / config_file).is_file():
    parser.error(f"--config={config!r}: {base / config_file} does not exist; give a path to one "
                 f"of the files in {REPO_ROOT / 'configs'}, relative to {base}")


def check_gcs_workdir(parser: argparse.ArgumentParser, workdir: str, why: str) -> None:
  if not workdir.startswith("gs://") or len(workdir) <= len("gs://"):
    parser.error(f"--workdir={workdir!r} must be a Cloud Storage path such as "
                 f"gs://my-bucket/vqvdm/demo: {why}")


def main_command(python: str, config: str, workdir: str, main_flags: Sequence[str]) -> list[str]:
  """``python -m vqvdm_jax.main --config=... --workdir=... [flags]`` as an argument list."""
  return [python, "-m", ENTRY_POINT, f"--config={config}", f"--workdir={workdir}",
          *main_flags]


class Runner:
  """Runs commands one after another, or only prints them (``dry_run``) as shell lines."""

  def __init__(self, dry_run: bool):
    self.dry_run = dry_run

  def run(self, command: Sequence[str], env: dict[str, str] | None = None,
          stdin_text: str | None = None) -> None:
    """Runs ``command`` (with extra ``env`` variables, ``stdin_text`` on its input)."""
    prefix = "".join(f"{name}={shlex.quote(value)} " for name, value in (env or {}).items())
    line = prefix + shlex.join(command)
    if stdin_text is not None:  # a heredoc, so the printed line runs as it is
      line += f" <<'EOF'\n{stdin_text.rstrip()}\nEOF"
    if self.dry_run:
      print(line, flush=True)
      return
    print(f"+ {line}", file=sys.stderr, flush=True)
    full_env = None if env is None else {**os.environ, **env}
    result = subprocess.run(list(command), env=full_env, input=stdin_text, text=True,
                            check=False)
    if result.returncode:
      raise SystemExit(f"Command failed with exit status {result.returncode}: {line}")
