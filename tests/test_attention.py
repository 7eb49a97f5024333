"""Choosing the attention kernel: 'xla', 'cudnn' or 'auto', validated in the config and the model."""

import types

import jax
import jax.numpy as jnp
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


def fake_backend(monkeypatch, backend: str, platform_version: str = "",
                 compute_capability: str = "") -> None:
  """Makes ``jax.default_backend()`` and ``jax.devices()`` describe another machine."""
  device = types.SimpleNamespace(client=types.SimpleNamespace(platform_version=platform_version),
                                 compute_capability=compute_capability)
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: [device])


CUDA_VERSION = "PJRT C API\ncuda 12040"


@pytest.mark.parametrize("backend, platform_version, capability, expected", [
    ("cpu", "", "", None),
    ("tpu", "PJRT C API\nTFRT TPU v5 lite", "", None),
    ("gpu", "PJRT C API\nrocm 60200", "gfx90a", None),  # AMD GPUs: no cuDNN
    ("gpu", CUDA_VERSION, "9.0", (9, 0)),
    ("gpu", CUDA_VERSION, "8.6", (8, 6)),
])
def test_compute_capability_is_read_only_on_nvidia_gpus(monkeypatch, backend, platform_version,
                                                        capability, expected):
  fake_backend(monkeypatch, backend, platform_version, capability)
  assert attention._cuda_compute_capability() == expected


@pytest.mark.parametrize("machine, dtype, head_dim, seq_len, masked, expected", [
    ("cpu", jnp.bfloat16, 64, 16, False, "xla"),
    ("tpu", jnp.bfloat16, 64, 16, False, "xla"),
    ("rocm", jnp.bfloat16, 64, 16, False, "xla"),
    ("hopper", jnp.bfloat16, 64, 16, False, "cudnn"),
    ("hopper", jnp.float16, 256, 15, False, "cudnn"),
    ("hopper", jnp.bfloat16, 64, 16, True, "cudnn"),
    ("hopper", jnp.float32, 64, 16, False, "xla"),
    ("hopper", jnp.bfloat16, 60, 16, False, "xla"),
    ("hopper", jnp.bfloat16, 264, 16, False, "xla"),
    ("hopper", jnp.bfloat16, 64, 15, True, "xla"),
    ("ampere", jnp.bfloat16, 128, 16, False, "cudnn"),
    ("ampere", jnp.bfloat16, 136, 16, False, "xla"),
])
def test_auto_resolves_by_backend_dtype_head_size_and_mask(monkeypatch, machine, dtype, head_dim,
                                                           seq_len, masked, expected):
  fake_backend(monkeypatch, *{
      "cpu": ("cpu",), "tpu": ("tpu", "PJRT C API\nTFRT TPU v5 lite"),
      "rocm": ("gpu", "PJRT C API\nrocm 60200", "gfx90a"),
      "hopper": ("gpu", CUDA_VERSION, "9.0"), "ampere": ("gpu", CUDA_VERSION, "8.0")}[machine])
  assert attention.resolve_attention_impl("auto", dtype, head_dim, seq_len, masked) == expected
  assert attention.resolve_attention_impl("xla", dtype, head_dim, seq_len, masked) == "xla"


@pytest.fixture
def attention_calls(monkeypatch):
  """Records (implementation, dtype, head_dim, sequence length, masked) of every attention the
  models trace, and runs each with XLA's kernel (this machine has no cuDNN)."""
  calls = []
  original = jax.nn.dot_product_attention

  def spy(query, key, value, *args, mask=None, implementation=None, **kwargs):
    calls.append((implementation, jnp.dtype(query.dtype).name, query.shape[-1], query.shape[1],
                  mask is not None))
    return original(query, key, value, *args, mask=mask, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  return calls


def traced_unet_attention(config, frames: int) -> None:
  z = jnp.zeros((1, frames, 4, 4, config.vqgan.model.latent_channels))
  jax.eval_shape(make_unet(config).init, jax.random.PRNGKey(0), z, jnp.zeros((1,), jnp.int32),
                 jnp.ones((1,)), jnp.zeros((1,), jnp.int32))


def test_auto_unet_takes_cudnn_per_layer_where_it_applies(hopper_gpu, attention_calls):
  # tiny: attention at level 1 and the middle, 16 channels in 2 heads (head dim 8), 2x2 tokens a
  # frame; the temporal attention is masked over the frames.
  config = load_config("tiny")
  config.diffusion.unet.attention_impl, config.diffusion.unet.dtype = "auto", "bfloat16"
  traced_unet_attention(config, frames=2)
  assert len(attention_calls) == 8  # down_1, middle, up_1 x 2: one spatial, one temporal each
  assert set(attention_calls) == {("cudnn", "bfloat16", 8, 4, False),
                                  ("cudnn", "bfloat16", 8, 2, True)}
  # Three frames: cuDNN's masked backward needs an even length, so only time falls back to XLA.
  attention_calls.clear()
  traced_unet_attention(config, frames=3)
  assert set(attention_calls) == {("cudnn", "bfloat16", 8, 4, False),
                                  ("xla", "bfloat16", 8, 3, True)}
  # float32 inputs: XLA everywhere.
  attention_calls.clear()
  config.diffusion.unet.dtype = "float32"
  traced_unet_attention(config, frames=2)
  assert {call[0] for call in attention_calls} == {"xla"} and len(attention_calls) == 8


def test_auto_unet_on_cpu_takes_xla(attention_calls):
  config = load_config("tiny")
  config.diffusion.unet.attention_impl, config.diffusion.unet.dtype = "auto", "bfloat16"
  traced_unet_attention(config, frames=2)
  assert {call[:2] for call in attention_calls} == {("xla", "bfloat16")}


@pytest.mark.parametrize("dtype, expected", [("bfloat16", "cudnn"), ("float32", "xla")])
def test_auto_vqgan_attention_follows_the_rule(hopper_gpu, attention_calls, dtype, expected):
  # tiny: one head of 16 channels over the 2 x 4 x 4 latent tokens of an 8 x 16 x 16 clip.
  config = load_config("tiny")
  config.vqgan.model.attention_impl, config.vqgan.model.dtype = "auto", dtype
  video = jnp.zeros((1, 8, 16, 16, 3), jnp.float32)
  jax.eval_shape(make_vqgan(config).init, {"params": jax.random.PRNGKey(0),
                                           "quantizer": jax.random.PRNGKey(1)}, video)
  assert set(attention_calls) == {(expected, dtype, 16, 32, False)}
  assert len(attention_calls) == 2  # the encoder's and the decoder's
