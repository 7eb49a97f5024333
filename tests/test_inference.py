"""A trained model as a first-class artifact: the recorded config, `vqvdm_jax.load`, the CLI on a
workdir alone, and what loading does not build."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from helpers import load_config, untrained_checkpoints
from xla_flags import compilation_cache_environment

import vqvdm_jax
from vqvdm_jax import config as config_lib
from vqvdm_jax import main as main_lib
from vqvdm_jax import recorded_config
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.evaluation.evaluate_vqgan import evaluate_vqgan
from vqvdm_jax.inference import sampling
from vqvdm_jax.training import diffusion_trainer, optimizers, vqgan_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Checkpoints of both tiny stages (steps 3 and 5), the recorded config, `--mode=sample`'s
  output."""
  workdir = tmp_path_factory.mktemp("trained")
  config = load_config("tiny")
  untrained_checkpoints(config, workdir, jax.devices()[:1], 3, 5)
  workdir_lib.check_or_record_config(config, workdir)
  main_lib.run("sample", config, str(workdir))
  return workdir


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
  return {str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
          for path in sorted(directory.rglob("*"))}


def subprocess_environment() -> dict[str, str]:
  """The tests' 8 CPU devices and compilation cache; the package as installed (no checkout
  on the path)."""
  env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
  return {**env, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(jax.device_count()),
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          **compilation_cache_environment()}


def test_recorded_config_rebuilds_every_shipped_config_exactly():
  for name, arg in (("tiny", None), ("demo", None), ("ucf101", None), ("ucf101", "runlocal"),
                    ("sky_timelapse", None)):
    config = load_config(name, arg)
    rebuilt = workdir_lib.config_from_json(workdir_lib.config_to_json(config))
    assert rebuilt.to_dict() == config.to_dict(), name  # tuples stay tuples, values equal
    assert workdir_lib.model_differences(config, rebuilt) == []


def test_load_outside_the_checkout_samples_what_sample_mode_wrote(workdir, tmp_path):
  script = f"""
import json, sys
import numpy as np
import vqvdm_jax
model = vqvdm_jax.load({str(workdir)!r})
videos = model.sample(seed=model.config.diffusion.sample.seed)
np.save({str(tmp_path / "videos.npy")!r}, videos)
print(json.dumps({{"step": model.step, "tokenizer_step": model.tokenizer.step,
                   "training_imported": sorted(m for m in sys.modules
                                               if m.startswith("vqvdm_jax.training"))}}))
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, env=subprocess_environment(), timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {"step": 5, "tokenizer_step": 5, "training_imported": []}
  written = np.load(workdir / "samples" / "000" / "videos.npz")
  np.testing.assert_array_equal(np.load(tmp_path / "videos.npy"), written["videos"])
  assert written["labels"].tolist() == [0, 1, 2, 3]


def test_load_builds_no_optimizer_and_no_trainer(workdir, monkeypatch):
  def forbidden(*args, **kwargs):
    raise AssertionError("loading a model must not build this")

  for owner, name in ((optax, "adam"), (optax, "adamw"), (optimizers, "make_optimizer"),
                      (vqgan_trainer.VQGANTrainer, "__init__"),
                      (diffusion_trainer.DiffusionTrainer, "__init__"),
                      (vqgan_trainer, "make_discriminator")):
    monkeypatch.setattr(owner, name, forbidden)
  compiled, compile_sampler = [], sampling.compile_sampler
  monkeypatch.setattr(sampling, "compile_sampler", lambda *args: compiled.append(args[1])
                      or compile_sampler(*args))
  model = vqvdm_jax.load(workdir, step=3)
  assert model.step == 3 and model.tokenizer.step == 3  # the tokenizer it was trained on
  videos = model.sample(labels=[1, 2], guidance_scale=3.0, sampler="ddim", num_steps=3, seed=4)
  assert videos.shape == (2, 8, 16, 16, 3) and videos.dtype == np.uint8
  np.testing.assert_array_equal(videos, model.sample(labels=[1, 2], guidance_scale=3.0,
                                                     sampler="ddim", num_steps=3, seed=4))
  assert len(compiled) == 1  # sampling again with the same settings reuses the sampler
  model.sample(labels=[1, 2], guidance_scale=2.0, sampler="ddim", num_steps=3, seed=4)
  assert [config.diffusion.sample.guidance_scale for config in compiled] == [3.0, 2.0]


def test_sampling_arguments_are_checked_with_the_configs_rules(workdir):
  model = vqvdm_jax.load(workdir)
  with pytest.raises(config_lib.ConfigError, match="diffusion.sample.sampler"):
    model.sample(sampler="euler")
  with pytest.raises(ValueError, match="labels must be classes in 0..3"):
    model.sample(labels=[0, 4])
  with pytest.raises(TypeError, match="Unknown sampling setting 'temperature'"):
    model.sample(temperature=0.5)


def test_tokenizer_api_round_trip_equals_the_trainers_reconstruction(workdir):
  config = load_config("tiny")
  clips = next(pipeline.eval_batches(config.data, 4, 4, config.seed))["video"]
  tokenizer = vqvdm_jax.load_tokenizer(workdir)
  assert tokenizer.step == 5
  codes = tokenizer.encode(clips)
  assert codes.shape == (4, 2, 4, 4, 4) and codes.dtype == np.float32
  recon = tokenizer.decode(codes)
  indices = tokenizer.encode_to_indices(clips)
  assert indices.shape == (4, 2, 4, 4)
  np.testing.assert_array_equal(tokenizer.decode(indices), recon)

  trainer = vqgan_trainer.VQGANTrainer(config, workdir, devices=jax.devices()[:1])
  state = trainer.checkpointer.restore(trainer.abstract_state())
  trainer.checkpointer.close()
  expected = trainer.reconstruct(vqgan_trainer.eval_params(state, config),
                                 state.quantizer_state, clips)
  # The same arithmetic fused differently: at most one uint8 step where a sum rounds otherwise.
  assert np.abs(recon.astype(int) - expected.astype(int)).max() <= 1


def test_a_conflicting_model_field_stops_naming_it_and_changes_nothing(workdir):
  before = snapshot(workdir)
  config = load_config("tiny")
  config.vqgan.model.channels = 16
  config.diffusion.unet.num_heads = 4
  config.vqgan.train.num_steps = 9  # not a model field: free to change
  config.vqgan.model.dtype = "bfloat16"  # how the model computes: free to change
  for call in (lambda: main_lib.run("train", config, str(workdir)),
               lambda: vqgan_trainer.train_vqgan(config, workdir),
               lambda: vqvdm_jax.load(workdir, config=config)):
    with pytest.raises(config_lib.ConfigError) as error:
      call()
    message = str(error.value)
    assert "config.vqgan.model.channels: trained with 8, given 16" in message
    assert "config.diffusion.unet.num_heads: trained with 2, given 4" in message
    assert "num_steps" not in message and "dtype" not in message
  assert snapshot(workdir) == before


def test_sample_mode_with_the_workdir_alone(workdir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  first = snapshot(copy / "samples" / "000")
  result = subprocess.run(
      [sys.executable, "-m", "vqvdm_jax.main", f"--workdir={copy}", "--mode=sample",
       "--config.diffusion.sample.label=2", "--config.diffusion.sample.num_videos=2"],
      capture_output=True, text=True, cwd=tmp_path, env=subprocess_environment(), timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Sampling (the first batch includes compiling): 2/2 (" in result.stderr  # progress
  # A second invocation: its own folder; the first one's outputs stay as they were.
  assert snapshot(copy / "samples" / "000") == first
  info = json.loads((copy / "samples" / "001" / "samples.json").read_text())
  assert info["labels"] == [2, 2] and info["step"] == 5 and info["num_videos"] == 2
  assert len(list((copy / "samples" / "001").glob("video_*.mp4"))) == 2


def test_evaluate_vqgan_with_the_recorded_config(workdir):
  config = recorded_config.get_config(str(workdir))
  config.vqgan.eval.num_clips = 4
  results = evaluate_vqgan(config, workdir)
  assert results["step"] == 5 and results["num_clips"] == 4


def test_a_workdir_without_a_record_needs_a_config(tmp_path):
  with pytest.raises(ValueError, match="holds no recorded config.*--config=configs/NAME.py"):
    recorded_config.get_config(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="has no config.json"):
    vqvdm_jax.load(tmp_path)
  config = load_config("tiny")
  with pytest.raises(FileNotFoundError, match="has no stage-1 checkpoint.*--mode=train_vqgan"):
    vqvdm_jax.load_tokenizer(tmp_path, config=config)
