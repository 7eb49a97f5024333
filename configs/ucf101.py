r"""UCF-101, 16x128x128, class + FPS conditioning: the paper's settings (docs/paper.md §3, §5).

Prepare once (UCF101.rar and the split zip unpacked into /data/UCF101), then run:
  python -m vqvdm_jax.data.prepare --dataset=ucf101 --source_dir=/data/UCF101 --data_dir=/data/tfds
  python -m vqvdm_jax.main --config=configs/ucf101.py --workdir=/tmp/ucf101 \
      --config.data.data_dir=/data/tfds
A few-step smoke run of this exact model:
  python -m vqvdm_jax.main --config=configs/ucf101.py:runlocal --workdir=/tmp/ucf101_smoke
"""

from vqvdm_jax.config import apply_runlocal, base_config


def get_config(arg: str | None = None):
  config = base_config()
  config.data.name = "ucf101"
  config.data.num_classes = 101
  config.data.num_workers = 8
  config.data.data_dir = ""  # set to prepare's --data_dir: --config.data.data_dir=/data/tfds
  config.data.split_number = 1
  config.data.frame_stride = 1  # 16 consecutive frames, as the paper trains
  config.vqgan.loss.disc_start = 10_000
  config.vqgan.train.batch_size = 16
  config.diffusion.class_drop_rate = 0.5  # rho of the paper's UCF-101 runs
  if arg == "runlocal":
    apply_runlocal(config)
  return config
