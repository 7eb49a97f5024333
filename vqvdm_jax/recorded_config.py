r"""The config a workdir recorded, as a config file: ``--config=<this file>:DIR``.

``python -m vqvdm_jax.main --workdir=DIR --mode=sample`` without ``--config`` loads it, so that
sampling and evaluation fields can still be overridden on the command line
(``--config.diffusion.sample.label=2``).
"""

from vqvdm_jax import workdir as workdir_lib


def get_config(workdir: str | None = None):
  if not workdir:
    raise ValueError("Give the workdir: --config=recorded_config.py:DIR")
  config = workdir_lib.read_config(workdir)
  if config is None:
    raise ValueError(f"{workdir} holds no recorded config ({workdir_lib.CONFIG_FILE}): pass "
                     f"--config=configs/NAME.py (a new workdir, or one trained before workdirs "
                     f"recorded their config).")
  return config
