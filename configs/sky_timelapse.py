r"""Sky Time-lapse, 16x128x128, unconditional (no class, no FPS): docs/paper.md §5, Experiments.

Prepare once (sky_train/ and sky_test/ frame folders in /data/sky), then run:
  python -m vqvdm_jax.data.prepare --dataset=sky_timelapse --source_dir=/data/sky \
      --data_dir=/data/tfds
  python -m vqvdm_jax.main --config=configs/sky_timelapse.py --workdir=/tmp/sky \
      --config.data.data_dir=/data/tfds
"""

from vqvdm_jax.config import apply_runlocal, base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.data.name = "sky_timelapse"
  config.data.num_classes = 0
  config.data.num_workers = 8
  config.data.data_dir = ""  # set to prepare's --data_dir: --config.data.data_dir=/data/tfds
  config.data.frame_stride = 1
  config.vqgan.loss.disc_start = 10_000
  config.vqgan.train.batch_size = 16
  config.diffusion.use_class = False  # no labels
  config.diffusion.use_fps = False  # frame folders carry no frame rate
  config.diffusion.class_drop_rate = 1.0  # rho = 1: every sample is trained unconditionally
  if arg == "runlocal":
    apply_runlocal(config)
  return config
