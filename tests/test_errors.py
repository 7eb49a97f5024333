"""Every error a user can cause on the command line is one short message: no traceback, a
non-zero exit, the problem and the fix named, and nothing in an existing workdir touched."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from helpers import load_config, untrained_checkpoints
from xla_flags import fast_compile_xla_flags

from vqvdm_jax import workdir as workdir_lib

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with both stages' checkpoints and its recorded config."""
  workdir = tmp_path_factory.mktemp("trained")
  config = load_config("tiny")
  untrained_checkpoints(config, workdir, jax.devices()[:1], 2)
  workdir_lib.check_or_record_config(config, workdir)
  return workdir


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
  return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
          for path in sorted(directory.rglob("*"))}


CASES = [  # (name, arguments; {trained}, {new}, {file} are filled in, words the message holds)
    ("unknown field", ["--config=" + TINY, "--workdir={new}", "--config.vqgan.nope=3"],
     ["--config.vqgan.nope", "no field 'nope'"]),
    ("bad value", ["--config=" + TINY, "--workdir={new}", "--config.vqgan.quantizer.kind=xyz"],
     ["config.vqgan.quantizer.kind", "'xyz'", "choose one of"]),
    ("value of the wrong type", ["--config=" + TINY, "--workdir={new}",
                                 "--config.data.num_frames=abc"], ["num_frames", "abc"]),
    ("negative step count", ["--config=" + TINY, "--workdir={new}",
                             "--config.vqgan.train.num_steps=-5"],
     ["config.vqgan.train.num_steps", "must be >= 1"]),
    ("zero videos", ["--config=" + TINY, "--workdir={trained}", "--mode=sample",
                     "--config.diffusion.sample.num_videos=0"],
     ["config.diffusion.sample.num_videos", "must be >= 1"]),
    ("missing config file", ["--config=" + str(REPO / "configs" / "nope.py"), "--workdir={new}"],
     ["nope.py", "--config=configs/NAME.py"]),
    ("no config, no record", ["--workdir={new}", "--mode=sample"],
     ["no recorded config", "--config=configs/NAME.py"]),
    ("sample on an empty workdir", ["--config=" + TINY, "--workdir={new}", "--mode=sample"],
     ["no stage-1 (tokenizer) checkpoint", "--mode=train_vqgan"]),
    ("evaluate without stage 2", ["--config=" + TINY, "--workdir={stage1}", "--mode=evaluate"],
     ["no stage-2 (diffusion) checkpoint", "--mode=train_diffusion"]),
    ("workdir is a file", ["--config=" + TINY, "--workdir={file}"], ["is a file", "--workdir"]),
    ("model field differs from the record", ["--workdir={trained}",
                                             "--config.vqgan.model.channels=16"],
     ["config.vqgan.model.channels: trained with 8, given 16", "new --workdir"]),
    ("indivisible batch", ["--config=" + TINY, "--workdir={new}", "--mode=train_vqgan",
                           "--config.vqgan.train.batch_size=3"],
     ["config.vqgan.train.batch_size=3", "multiple of 2"]),
    ("output folder not writable", ["--workdir={trained}", "--mode=sample",
                                    "--output_dir={unwritable}"],
     ["Cannot write to {unwritable}", "--output_dir"]),
    ("dataset not prepared", ["--config=" + str(REPO / "configs" / "ucf101.py"),
                              "--workdir={new}", "--config.data.data_dir={missing}"],
     ["ucf101", "vqvdm_jax.data.prepare"]),
]


# Read-only even for root, which file permissions are not (the tests may run as root).
UNWRITABLE = Path("/sys")


def _writable(directory: Path) -> bool:
  probe = directory / "vqvdm_jax_test_probe"
  try:
    probe.mkdir()
  except OSError:
    return False
  probe.rmdir()
  return True


@pytest.mark.parametrize("name,arguments,words", CASES, ids=[case[0] for case in CASES])
def test_user_errors_are_one_clear_message(trained, tmp_path, name, arguments, words):
  stage1 = tmp_path / "stage1"
  (stage1 / "vqgan").mkdir(parents=True)
  os.symlink(trained / "vqgan" / "checkpoints", stage1 / "vqgan" / "checkpoints")
  (stage1 / "config.json").write_text((trained / "config.json").read_text())
  (tmp_path / "afile").write_text("not a directory")
  places = {"trained": trained, "new": tmp_path / "new", "file": tmp_path / "afile",
            "stage1": stage1, "missing": tmp_path / "no_data",
            "unwritable": UNWRITABLE / "vqvdm_jax_test_output"}
  if "{unwritable}" in " ".join(arguments) and _writable(UNWRITABLE):
    pytest.skip(f"{UNWRITABLE} is writable here (sysfs is read-only even for root on Linux)")
  before = snapshot(trained)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
         "XLA_FLAGS": fast_compile_xla_flags()}
  result = subprocess.run(
      [sys.executable, "-m", "vqvdm_jax.main", *(a.format(**places) for a in arguments)],
      capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert result.returncode == 2, (name, result.returncode, result.stderr[-2000:])
  errors = [line for line in result.stderr.splitlines() if not line.startswith(("I", "W"))]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  message = "\n".join(errors)
  assert message.startswith("Error: ") and len(errors) <= 4, message
  for word in words:
    word = word.format(**places)
    assert word in message, (word, message)
  assert snapshot(trained) == before
  assert not (tmp_path / "new" / "samples").exists()


def test_the_trainers_and_inference_import_without_tensorflow():
  """clu's summary writers import TensorFlow (~4 s); a command that stops on a bad argument, or
  that loads a model and samples, must not wait for it. Training imports it with its writer."""
  modules = ["vqvdm_jax.main", "vqvdm_jax.training.vqgan_trainer",
             "vqvdm_jax.training.diffusion_trainer", "vqvdm_jax.training.token_trainer",
             "vqvdm_jax.inference.model", "vqvdm_jax.inference.sampling"]
  probe = (f"import sys; import {', '.join(modules)}; "
           "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'tensorflow'))")
  result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=120, check=True)
  assert result.stdout.strip() == "[]", result.stdout[-2000:]
