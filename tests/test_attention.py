"""Choosing the attention kernel: 'xla', 'cudnn' or 'auto', validated in the config and the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config

from vqvdm_jax import config as config_lib
from vqvdm_jax.diffusion.model import make_unet
from vqvdm_jax.models import attention
from vqvdm_jax.models.vqgan import make_vqgan


@pytest.fixture
def hopper_gpu(monkeypatch):
  """Pretends JAX runs on an NVIDIA GPU of compute capability 9.0, for the shape rules."""
  monkeypatch.setattr(attention, "_cuda_compute_capability", lambda: (9, 0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_auto_resolves_to_xla_on_cpu(dtype):
  assert attention.resolve_attention_impl("auto", dtype, 64, 16, masked=False) == "xla"
  assert attention.resolve_attention_impl("xla", dtype, 64, 16, masked=False) == "xla"


def test_explicit_cudnn_on_cpu_says_it_needs_a_gpu_and_what_to_use_instead():
  with pytest.raises(ValueError, match=r"needs an NVIDIA GPU.*backend is 'cpu'.*'auto'"):
    attention.resolve_attention_impl("cudnn", jnp.bfloat16, 64, 16, masked=False)


def test_unknown_attention_impl_is_rejected_with_choices():
  with pytest.raises(ValueError, match=r"'xla', 'cudnn', 'auto'.*'flash'"):
    attention.resolve_attention_impl("flash", jnp.bfloat16, 64, 16, masked=False)


def test_auto_takes_cudnn_on_a_gpu_only_where_its_kernel_applies(hopper_gpu):
  resolve = attention.resolve_attention_impl
  assert resolve("auto", jnp.bfloat16, 64, 16, masked=False) == "cudnn"
  assert resolve("auto", jnp.float16, 256, 15, masked=False) == "cudnn"
  assert resolve("auto", jnp.bfloat16, 64, 16, masked=True) == "cudnn"
  assert resolve("auto", jnp.float32, 64, 16, masked=False) == "xla"  # half precision only
  assert resolve("auto", jnp.bfloat16, 12, 16, masked=False) == "xla"  # head dim % 8
  assert resolve("auto", jnp.bfloat16, 512, 16, masked=False) == "xla"  # head dim too large
  assert resolve("auto", jnp.bfloat16, 64, 5, masked=True) == "xla"  # masked, odd length
  with pytest.raises(ValueError, match=r"head dimension must be a multiple of 8.*got 12"):
    resolve("cudnn", jnp.bfloat16, 12, 16, masked=False)


def test_head_dims_above_128_need_hopper(monkeypatch):
  monkeypatch.setattr(attention, "_cuda_compute_capability", lambda: (8, 0))
  assert attention.resolve_attention_impl("auto", jnp.bfloat16, 128, 16, masked=False) == "cudnn"
  assert attention.resolve_attention_impl("auto", jnp.bfloat16, 256, 16, masked=False) == "xla"


@pytest.mark.parametrize("group", ["vqgan.model", "diffusion.unet"])
def test_config_rejects_an_unknown_attention_impl_naming_the_field(group):
  config = load_config("tiny")
  config[group.split(".")[0]][group.split(".")[1]].attention_impl = "flash"
  with pytest.raises(config_lib.ConfigError,
                     match=rf"config\.{group}\.attention_impl: got 'flash'; choose one of"):
    config_lib.validate(config)


@pytest.mark.parametrize("group", ["vqgan.model", "diffusion.unet"])
def test_config_rejects_cudnn_attention_in_float32_and_says_how_to_fix_it(group):
  config = load_config("tiny")
  fields = config[group.split(".")[0]][group.split(".")[1]]
  fields.attention_impl = "cudnn"
  with pytest.raises(config_lib.ConfigError,
                     match=rf"config\.{group}\.attention_impl.*--config\.{group}\.dtype=bfloat16"):
    config_lib.validate(config)
  fields.dtype = "bfloat16"
  config_lib.validate(config)  # the device is checked when the model is built, not here


def test_cudnn_models_fail_when_built_on_cpu():
  """The field reaches every attention layer: building the model is where the device is known."""
  config = load_config("tiny")
  for fields in (config.vqgan.model, config.diffusion.unet):
    fields.attention_impl, fields.dtype = "cudnn", "bfloat16"
  z = jnp.zeros((1, 2, 4, 4, 4), jnp.float32)
  with pytest.raises(ValueError, match=r"attention_impl='cudnn'.*needs an NVIDIA GPU"):
    jax.eval_shape(make_unet(config).init, jax.random.PRNGKey(0), z, jnp.zeros((1,), jnp.int32),
                   jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
  video = jnp.zeros((1, 8, 16, 16, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"attention_impl='cudnn'.*needs an NVIDIA GPU"):
    jax.eval_shape(make_vqgan(config).init, {"params": jax.random.PRNGKey(0),
                                             "quantizer": jax.random.PRNGKey(1)}, video)


def test_auto_unet_on_cpu_equals_the_xla_unet():
  """In bfloat16, where 'auto' would take cuDNN on a GPU."""
  config = load_config("tiny")
  config.diffusion.unet.dtype = "bfloat16"
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((2, 2, 4, 4, 4)), jnp.float32)
  t, fps, labels = jnp.array([3, 40]), jnp.array([8.0, 16.0]), jnp.array([0, 3])
  xla_unet = make_unet(config)
  params = jax.jit(xla_unet.init)(jax.random.key(1, impl="rbg"), z, t, fps, labels)
  config.diffusion.unet.attention_impl = "auto"
  auto_unet = make_unet(config)
  np.testing.assert_array_equal(jax.jit(auto_unet.apply)(params, z, t, fps, labels),
                                jax.jit(xla_unet.apply)(params, z, t, fps, labels))


def test_auto_vqgan_on_cpu_equals_the_xla_vqgan():
  config = load_config("tiny")
  video = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 8, 16, 16, 3)), jnp.float32)
  xla_model = make_vqgan(config)
  variables = jax.jit(xla_model.init)({"params": jax.random.PRNGKey(0),
                                       "quantizer": jax.random.PRNGKey(1)}, video)
  config.vqgan.model.attention_impl = "auto"
  auto_model = make_vqgan(config)
  np.testing.assert_array_equal(jax.jit(auto_model.apply)(variables, video)[0],
                                jax.jit(xla_model.apply)(variables, video)[0])
