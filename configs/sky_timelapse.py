r"""Sky Time-lapse, 16x128x128, unconditional (no class, no FPS): SPEC.md §4.

Run:
  python -m vqvdm_jax.main --config=configs/sky_timelapse.py --workdir=/tmp/sky
"""

from vqvdm_jax.config import base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.data.name = "sky_timelapse"
  config.data.num_classes = 0
  config.data.num_workers = 8
  config.vqgan.loss.disc_start = 10_000
  config.vqgan.train.batch_size = 16
  config.diffusion.use_class = False  # no labels
  config.diffusion.use_fps = False  # frame folders carry no frame rate
  config.diffusion.class_drop_rate = 1.0  # rho = 1: every sample is trained unconditionally
  if arg == "runlocal":
    config.data.name = "synthetic"
    config.data.num_classes = 4
    config.data.num_workers = 0
    config.vqgan.train.batch_size = 2
    config.vqgan.train.num_steps = 3
    config.vqgan.train.log_every = 1
    config.vqgan.loss.disc_start = 1
    config.diffusion.train.batch_size = 2
    config.diffusion.train.num_steps = 3
    config.diffusion.train.log_every = 1
    config.diffusion.sample.num_steps = 2
    config.diffusion.sample.num_videos = 2
    config.diffusion.sample.batch_size = 2
  return config
