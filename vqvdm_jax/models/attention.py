"""Which kernel computes attention: XLA's, or cuDNN's fused (flash) attention on NVIDIA GPUs.

``jax.nn.dot_product_attention(..., implementation=...)`` takes ``'xla'`` (any backend, any
dtype; what ``None`` means today) or ``'cudnn'``, which runs only on an NVIDIA GPU, with float16
or bfloat16 inputs and a head dimension that is a multiple of 8 and at most 128 (256 from Hopper
on), and raises a low-level error otherwise. The config fields ``vqgan.model.attention_impl`` and
``diffusion.unet.attention_impl`` pick ``'xla'``, ``'cudnn'``, or ``'auto'``: cuDNN where it
applies and XLA elsewhere (always XLA on CPU and TPU), so one config runs on every machine.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vqvdm_jax.config import ATTENTION_IMPLS  # listed with the config, which imports no JAX

_HALF_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _cuda_compute_capability() -> tuple[int, ...] | None:
  """The first GPU's compute capability when JAX runs on NVIDIA GPUs (not ROCm), else None."""
  if jax.default_backend() != "gpu":
    return None
  device = jax.devices()[0]
  if "cuda" not in device.client.platform_version.lower():
    return None
  return tuple(int(part) for part in device.compute_capability.split("."))


def cudnn_unsupported_reason(dtype: Any, head_dim: int, seq_len: int, masked: bool) -> str | None:
  """Why cuDNN flash attention cannot run an attention of this kind here, or None if it can.

  A mask reaches cuDNN as an additive bias, and its backward pass with a bias needs an even
  sequence length; the check is made for training, the stricter case.
  """
  capability = _cuda_compute_capability()
  if capability is None:
    return f"it needs an NVIDIA GPU, and JAX's backend is {jax.default_backend()!r}"
  if jnp.dtype(dtype) not in _HALF_DTYPES:
    return f"it needs float16 or bfloat16 inputs, got {jnp.dtype(dtype).name}"
  max_head_dim = 256 if capability >= (9, 0) else 128
  if head_dim % 8 or head_dim > max_head_dim:
    return (f"the head dimension must be a multiple of 8 and at most {max_head_dim} on this "
            f"GPU, got {head_dim} (channels / heads)")
  if masked and seq_len % 2:
    return f"a masked attention needs an even sequence length, got {seq_len}"
  return None


def resolve_attention_impl(attention_impl: str, dtype: Any, head_dim: int, seq_len: int,
                           masked: bool) -> str:
  """``'xla'`` or ``'cudnn'`` for ``jax.nn.dot_product_attention``'s ``implementation``.

  ``'auto'`` takes cuDNN wherever :func:`cudnn_unsupported_reason` finds nothing against it; an
  explicit ``'cudnn'`` that cannot run fails here, when the model is first traced, saying why.
  """
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}.")
  if attention_impl == "xla":
    return "xla"
  reason = cudnn_unsupported_reason(dtype, head_dim, seq_len, masked)
  if attention_impl == "auto":
    return "xla" if reason else "cudnn"
  if reason:
    raise ValueError(f"attention_impl='cudnn' (cuDNN flash attention) cannot run here: {reason}. "
                     f"Use 'auto' (cuDNN where it applies, XLA elsewhere) or 'xla'.")
  return "cudnn"
