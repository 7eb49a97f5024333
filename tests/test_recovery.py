"""Recovery: stage 2 resumes bit-identically, and an unreadable newest checkpoint falls back to
the previous one (both stages) or ends in one clear error."""

import contextlib
import gc
import re
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import load_config
from test_preemption import _assert_same_leaves, _diffusion_trainer

from vqvdm_jax import checkpointing
from vqvdm_jax.data import latents as latents_lib
from vqvdm_jax.training import diffusion_trainer


def _stage1_checkpoint(workdir):
  """An untrained stage-1 checkpoint of step 4: stage 2 needs latents, not good ones."""
  from vqvdm_jax.training import vqgan_trainer
  trainer = vqgan_trainer.VQGANTrainer(load_config("tiny"), workdir, devices=jax.devices()[:1])
  trainer.checkpointer.save(4, trainer.initial_state().replace(step=jax.numpy.asarray(4)),
                            force=True)
  trainer.checkpointer.close()
  return workdir


def _train_stage2(workdir, num_steps):
  config = load_config("tiny")
  config.diffusion.train.num_steps = num_steps
  return jax.device_get(diffusion_trainer.train_diffusion(config, workdir))


def test_stage2_resumes_bit_identically_after_a_stop(tmp_path, monkeypatch):
  uninterrupted = _stage1_checkpoint(tmp_path / "uninterrupted")
  expected = _train_stage2(uninterrupted, 4)  # encodes the latent cache
  # What a run killed after its step-2 checkpoint leaves: the uninterrupted run's own step-2
  # checkpoint (state and latent iterator), written on the way, and nothing after it.
  workdir = tmp_path / "resumed"
  shutil.copytree(uninterrupted / "vqgan", workdir / "vqgan")
  (workdir / "diffusion" / "checkpoints").mkdir(parents=True)
  (workdir / "diffusion" / "latents").symlink_to(uninterrupted / "diffusion" / "latents")
  shutil.copytree(uninterrupted / "diffusion" / "checkpoints" / "2",
                  workdir / "diffusion" / "checkpoints" / "2")
  assert checkpointing.checkpoint_steps(workdir / "diffusion" / "checkpoints") == [2]

  def must_not_start_fresh(*args, **kwargs):
    raise AssertionError("a checkpoint exists; training must resume from it")

  with monkeypatch.context() as patch:
    patch.setattr(diffusion_trainer.DiffusionTrainer, "initial_state", must_not_start_fresh)
    resumed = _train_stage2(workdir, 4)
  assert int(resumed.step) == 4
  # U-Net weights, EMA, Adam state, rng, step, scale and shift: every leaf, bit for bit.
  _assert_same_leaves(resumed, expected)

  # The checkpoint holds that state and the latent iterator 4 batches in: it continues with
  # the 5th batch of a fresh iterator, as the uninterrupted run would.
  config = load_config("tiny")
  cache = latents_lib.LatentCache(latents_lib.cache_directory(workdir, 4))
  trainer = diffusion_trainer.DiffusionTrainer(config, workdir, cache.latent_shape)
  batches = latents_lib.train_iterator(cache, config.diffusion.train.batch_size, config.seed)
  restored = jax.device_get(trainer.restore(batches))
  trainer.checkpointer.close()
  _assert_same_leaves(restored, expected)
  fresh = latents_lib.train_iterator(cache, config.diffusion.train.batch_size, config.seed)
  fifth = [next(fresh) for _ in range(5)][-1]
  following = next(batches)
  assert following.keys() == fifth.keys()
  for key in fifth:
    np.testing.assert_array_equal(following[key], fifth[key], err_msg=key)


@contextlib.contextmanager
def _unraisable_recorded():
  """Records what would reach stderr as "Exception ignored in ..." (collected at the end)."""
  escaped, previous_hook = [], sys.unraisablehook
  sys.unraisablehook = escaped.append
  try:
    yield escaped
    gc.collect()
  finally:
    sys.unraisablehook = previous_hook


def _described(unraisables) -> list[str]:
  return [f"{type(u.exc_value).__name__}: {str(u.exc_value)[:200]}" for u in unraisables]


def _corrupt(checkpoint: Path, how: str) -> None:
  """What an interrupted copy or a full disk leaves: a truncated data file, or no metadata."""
  state = checkpoint / "state"
  if how == "truncated":
    for data_file in (state / "ocdbt.process_0" / "d").iterdir():
      data_file.write_bytes(data_file.read_bytes()[:7])
  else:
    (state / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "no_metadata"])
def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, how, caplog):
  config = load_config("tiny")
  from vqvdm_jax.training import vqgan_trainer
  trainers = {"vqgan": vqgan_trainer.VQGANTrainer(config, tmp_path, devices=jax.devices()[:1]),
              "diffusion": _diffusion_trainer(tmp_path)[1]}
  initial = {"vqgan": trainers["vqgan"].initial_state(),
             "diffusion": trainers["diffusion"].initial_state(1.0, 0)}
  for stage, trainer in trainers.items():
    for step in (2, 4):
      trainer.checkpointer.save(step, initial[stage].replace(step=jax.numpy.asarray(step)),
                                force=True)
    trainer.checkpointer.close()
    _corrupt(tmp_path / stage / "checkpoints" / "4", how)

  # Loading for inference reads the previous step too, and moves nothing. It reads the fields
  # it asks for by their given structure, so it needs no _METADATA: intact arrays still read.
  diffusion_checkpoints = tmp_path / "diffusion" / "checkpoints"
  with _unraisable_recorded() as escaped:
    fields, step = checkpointing.restore_fields(diffusion_checkpoints,
                                                {"params": initial["diffusion"].params})
  assert not escaped, _described(escaped)
  assert step == (2 if how == "truncated" else 4) and (diffusion_checkpoints / "4").is_dir()
  leaves_equal = [np.array_equal(got, want) for got, want in zip(
      jax.tree.leaves(jax.device_get(fields["params"])),
      jax.tree.leaves(jax.device_get(initial["diffusion"].params)), strict=True)]
  assert all(leaves_equal)
  read_only = [r.getMessage() for r in caplog.records
               if f"step 4 in {diffusion_checkpoints} cannot be restored" in r.getMessage()]
  assert len(read_only) == (how == "truncated") and not any("moved" in m for m in read_only), (
      read_only)
  caplog.clear()

  reopened = {"vqgan": vqgan_trainer.VQGANTrainer(config, tmp_path, devices=jax.devices()[:1]),
              "diffusion": _diffusion_trainer(tmp_path)[1]}
  with _unraisable_recorded() as escaped:
    restored = {"vqgan": reopened["vqgan"].restore_or_init(),
                "diffusion": reopened["diffusion"].restore()}
  # Orbax's other reads of the unreadable step end on its threads after it gave up, and their
  # coroutines are collected later: none of them reaches stderr (~1,200 tracebacks before).
  assert not escaped, _described(escaped)
  for stage, trainer in reopened.items():
    trainer.checkpointer.close()
    assert int(restored[stage].step) == 2, stage
    for got, want in zip(jax.tree.leaves(jax.device_get(restored[stage].params)),
                         jax.tree.leaves(jax.device_get(initial[stage].params)), strict=True):
      np.testing.assert_array_equal(got, want)
    checkpoints = tmp_path / stage / "checkpoints"
    assert (checkpoints / "4.unrestorable").is_dir() and not (checkpoints / "4").exists()
    warnings = [r.getMessage() for r in caplog.records
                if f"step 4 in {checkpoints} cannot be restored" in r.getMessage()]
    assert len(warnings) == 1, warnings
    if how == "truncated":  # the reason is the read that failed, not Orbax's wrapper around it
      assert f'"{checkpoints / "4" / "state"}/"' in warnings[0], warnings
    else:  # not Orbax's "pytree structure error": the file that is missing
      assert f"{checkpoints / '4' / 'state' / '_METADATA'} is missing" in warnings[0], warnings


def test_no_restorable_checkpoint_is_one_clear_error(tmp_path):
  _, trainer = _diffusion_trainer(tmp_path)
  trainer.checkpointer.save(2, trainer.initial_state(1.0, 0), force=True)
  trainer.checkpointer.close()
  _corrupt(tmp_path / "diffusion" / "checkpoints" / "2", "truncated")
  _, reopened = _diffusion_trainer(tmp_path)
  checkpoints = tmp_path / "diffusion" / "checkpoints"
  # The reason is the read that failed (it names the step's files), not Orbax's wrapper.
  files = re.escape(f"{checkpoints / '2' / 'state'}/")
  with _unraisable_recorded() as escaped, pytest.raises(
      checkpointing.UnrestorableCheckpointError,
      match=rf"No checkpoint in .* can be restored \(step 2: .*{files}"):
    reopened.restore()
  reopened.checkpointer.close()
  assert not escaped, _described(escaped)
  assert (checkpoints / "2.unrestorable").is_dir()  # kept


def test_cpu_checkpoints_save_replicated_arrays_whole_and_restore_them(tmp_path, monkeypatch):
  """Orbax's replica-parallel saving would slice each replicated array once a device (one
  compiled ``lax.slice`` each); on CPU devices the project saves them whole."""
  slices = []
  original = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim",
                      lambda *args, **kwargs: slices.append(args) or original(*args, **kwargs))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = {"kernel": jax.device_put(np.arange(64.0, dtype=np.float32).reshape(8, 8), replicated)}
  checkpointer = checkpointing.Checkpointer(tmp_path, save_every=1, keep=2)
  assert checkpointer.save(1, state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(state)
  checkpointer.close()
  assert jax.device_count() == 8 and slices == []
  np.testing.assert_array_equal(np.asarray(restored["kernel"]), np.asarray(state["kernel"]))
  assert restored["kernel"].sharding == replicated
