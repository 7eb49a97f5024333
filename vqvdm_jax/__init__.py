"""vqvdm_jax: VQ-VDM (3D VQGAN + latent video diffusion) in JAX/Flax.

Layout convention, used everywhere in the package: tensors are channel-last.
Videos are ``[B, T, H, W, C]`` (uint8 in ``[0, 255]`` on the host, float in ``[-1, 1]`` on
the device) and latents are ``[B, t, h, w, c]``.
"""

__version__ = "0.1.0"
