"""vqvdm_jax: VQ-VDM (3D VQGAN + latent video diffusion) in JAX/Flax.

Layout convention, used everywhere in the package: tensors are channel-last.
Videos are ``[B, T, H, W, C]`` (uint8 in ``[0, 255]`` on the host, float in ``[-1, 1]`` on
the device) and latents are ``[B, t, h, w, c]``.

Use a trained model::

  import vqvdm_jax
  model = vqvdm_jax.load("DIR")                  # tokenizer + diffusion model, EMA weights
  videos = model.sample(labels=[0, 1], seed=0)   # uint8 [2, T, H, W, 3]
  codes = model.tokenizer.encode(videos)         # quantized latents [2, t, h, w, c]
  tokenizer = vqvdm_jax.load_tokenizer("DIR")    # stage 1 only
"""

__version__ = "0.1.0"

__all__ = ["load", "load_tokenizer", "VideoModel", "Tokenizer"]


def __getattr__(name: str):
  # Lazy, so that `python -m vqvdm_jax.main --help` and config errors answer before JAX loads.
  if name in ("load", "VideoModel"):
    from vqvdm_jax.inference import model
    return getattr(model, name)
  if name in ("load_tokenizer", "Tokenizer"):
    from vqvdm_jax.inference import tokenizer
    return getattr(tokenizer, name)
  raise AttributeError(f"module 'vqvdm_jax' has no attribute {name!r}")
