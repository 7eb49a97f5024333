"""The mesh, FSDP parameter sharding, and checkpoints that move between meshes."""

import jax
import numpy as np
import pytest
from helpers import load_config
from jax.sharding import PartitionSpec

from vqvdm_jax import config as config_lib
from vqvdm_jax import sharding
from vqvdm_jax.training import diffusion_trainer

LATENT_SHAPE = (2, 4, 4, 4)


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((3, 3, 3, 16, 64), 4, min_size=0) == PartitionSpec(
      None, None, None, None, "fsdp")
  assert sharding.fsdp_spec((3, 3, 3, 64, 6), 4, min_size=0) == PartitionSpec(
      None, None, None, "fsdp")  # 6 is not divisible by 4: the next largest dimension is.
  assert sharding.fsdp_spec((5, 7), 4, min_size=0) == PartitionSpec()
  assert sharding.fsdp_spec((64,), 4, min_size=4096) == PartitionSpec()  # too small to split
  assert sharding.fsdp_spec((64, 64), 1, min_size=0) == PartitionSpec()  # no fsdp axis


def test_batch_is_split_over_data_and_fsdp():
  config = load_config("tiny")
  config.mesh.shape = (2, 2)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
  assert sharding.data_parallel_size(mesh) == 4
  batch = sharding.shard_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh)
  assert {shard.data.shape for shard in batch["x"].addressable_shards} == {(2, 3)}


def test_fsdp_config_needs_an_fsdp_axis():
  config = load_config("tiny")
  config.mesh.axes, config.mesh.shape = ("data",), (-1,)
  config.mesh.param_sharding = "fsdp"
  with pytest.raises(config_lib.ConfigError, match="mesh.param_sharding"):
    config_lib.validate(config)


def _trainer(tmp_path, mesh_shape, param_sharding):
  config = load_config("tiny")
  config.mesh.shape = mesh_shape
  config.mesh.param_sharding = param_sharding
  config.mesh.fsdp_min_size = 0  # the tiny model's arrays are all small: split them anyway
  return diffusion_trainer.DiffusionTrainer(config, tmp_path, LATENT_SHAPE,
                                            devices=jax.devices()[:int(np.prod(mesh_shape))])


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {"latent": rng.normal(size=(8, *LATENT_SHAPE)).astype(np.float32),
          "label": rng.integers(0, 4, 8).astype(np.int32),
          "fps": np.full(8, 8.0, np.float32)}


def _leaves(tree):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(tree))]


def test_fsdp_training_equals_replicated_training_and_restores_onto_another_mesh(tmp_path):
  # The reference is one device, the plain computation (and the tiny step the other tests
  # compile, so it often comes from the compilation cache); the FSDP mesh splits the batch
  # four ways over both axes and the weights two ways.
  replicated = _trainer(tmp_path / "replicated", (1, 1), "replicated")
  fsdp = _trainer(tmp_path / "fsdp", (2, 2), "fsdp")
  kernel = fsdp.state_sharding.params["input_conv"]["kernel"]
  assert "fsdp" in kernel.spec  # parameters really are split...
  assert fsdp.state_sharding.opt_state[1][0].mu["input_conv"]["kernel"] == kernel  # ...
  assert fsdp.state_sharding.ema_params["input_conv"]["kernel"] == kernel  # alike.

  states = []
  for trainer in (replicated, fsdp):
    state, _ = trainer.step(trainer.initial_state(1.5, 0), _batch(0))
    states.append(state)
  # Gradients (Adam's first moment is 0.1 x the gradient) agree to float32 rounding, relative to
  # each array's scale: the sums only run in another order.
  first_moments = [state.opt_state[1][0].mu for state in states]
  for got, want in zip(_leaves(first_moments[1]), _leaves(first_moments[0]), strict=True):
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-9
  # Adam's first step moves each weight by lr * g / (|g| + eps): rounding in a near-zero gradient
  # shows up as a fraction of lr = 1e-3, never more.
  for got, want in zip(_leaves(states[1].params), _leaves(states[0].params), strict=True):
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)

  # A checkpoint written by the replicated run restores onto the FSDP mesh, sharded.
  replicated.checkpointer.save(2, states[0], force=True)
  replicated.checkpointer.close()
  moved = _trainer(tmp_path / "replicated", (2, 2), "fsdp")
  restored = moved.restore()
  moved.checkpointer.close()
  fsdp.checkpointer.close()
  restored_kernel = restored.params["input_conv"]["kernel"]
  assert restored_kernel.sharding.spec == kernel.spec
  for got, want in zip(_leaves(restored), _leaves(states[0]), strict=True):
    np.testing.assert_array_equal(got, want)


def _distinct_state(trainer, seed):
  """A state whose every leaf holds its own random values (an initial state's moments are 0)."""
  rng = np.random.default_rng(seed)

  def fill(leaf, leaf_sharding):
    if np.issubdtype(leaf.dtype, np.floating):
      values = rng.normal(size=leaf.shape).astype(leaf.dtype)
    else:
      values = rng.integers(1, 1000, size=leaf.shape).astype(leaf.dtype)
    return jax.device_put(values, leaf_sharding)

  return jax.tree.map(fill, trainer.abstract_state(), trainer.state_sharding)


def _pieces(array):
  """Into how many distinct pieces the array is split over its devices."""
  return array.size // int(np.prod(array.addressable_shards[0].data.shape))


def test_an_fsdp_checkpoint_restores_onto_other_mesh_shapes_with_their_sharding(tmp_path):
  saver = _trainer(tmp_path, (1, 4), "fsdp")
  state = _distinct_state(saver, 0)
  kernel = state.params["input_conv"]["kernel"]
  assert "fsdp" in kernel.sharding.spec and _pieces(kernel) == 4  # saved split four ways
  saver.checkpointer.save(3, state, force=True)
  saver.checkpointer.close()
  saved = _leaves(state)

  for mesh_shape in ((2, 2), (4, 1)):
    trainer = _trainer(tmp_path, mesh_shape, "fsdp")
    restored = trainer.restore()
    trainer.checkpointer.close()
    assert trainer.mesh.devices.shape == mesh_shape
    for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(restored),
                                      jax.tree.leaves(trainer.state_sharding), strict=True):
      assert leaf.sharding == expected, (mesh_shape, jax.tree_util.keystr(path), leaf.sharding)
    # On (2, 2) the weights are split in two; on (4, 1) the fsdp axis has one device: whole.
    restored_kernel = restored.params["input_conv"]["kernel"]
    split = {(2, 2): 2, (4, 1): 1}[mesh_shape]
    assert _pieces(restored_kernel) == split, mesh_shape
    for got, want in zip(_leaves(restored), saved, strict=True):
      np.testing.assert_array_equal(got, want)
