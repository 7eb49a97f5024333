"""Trained models for users: load a workdir's tokenizer and diffusion model, encode, decode and
sample. Stands below training and evaluation, which use it, and imports neither."""
