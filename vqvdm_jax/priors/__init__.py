"""Token priors over the stage-1 tokenizer's code indices: autoregressive (Taming / TATS) and
masked (MaskGIT / MAGVIT). Beside ``diffusion/``: models, losses and sampling loops as functions
of arrays; training and loading live above, in ``training/`` and ``inference/``."""
