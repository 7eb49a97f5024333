"""The demo's quantizer (issue 18: FSQ, 5 levels on each of 8 latent channels) learns on the tiny
config: the quantized reconstruction error falls below a stated bound."""

import jax
import numpy as np
from helpers import load_config

from vqvdm_jax.data import pipeline
from vqvdm_jax.training import vqgan_trainer

# Median L2 (on [-1, 1]) of the last ten of 60 steps on four tiny clips through the quantizer:
# measured 0.064 (first step 1.14); the best single colour of these clips scores 0.089.
SETTLED_L2_BOUND = 0.075


def test_tiny_fsq_tokenizer_quantized_error_falls_below_bound(tmp_path):
  """Not merely below its start: below a fixed bound that is under the error of the clips' best
  single colour (0.089), so the quantized latent carries more than the mean colour."""
  config = load_config("tiny")
  config.data.num_train_clips = 4
  config.vqgan.model.latent_channels = 8  # the demo's quantizer: FSQ, 5 levels on 8 channels
  config.vqgan.quantizer.kind = "fsq"
  config.vqgan.quantizer.fsq_levels = (5,) * 8
  config.vqgan.train.batch_size = 4
  config.vqgan.loss.disc_start = 10_000  # reconstruction only
  config.vqgan.optim.grad_clip_norm = 1.0
  trainer = vqgan_trainer.VQGANTrainer(config, tmp_path, devices=jax.devices()[:1])
  batches = pipeline.train_iterator(config.data, 4, config.seed)
  state = trainer.initial_state()
  l2 = []
  for _ in range(60):
    state, metrics = trainer.step(state, next(batches))
    l2.append(float(metrics["loss/l2"]))
  trainer.checkpointer.close()
  settled = float(np.median(l2[-10:]))
  assert settled < SETTLED_L2_BOUND, (l2[:3], l2[-10:])
