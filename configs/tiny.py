r"""A few-channel model on 8x16x16 clips, for the tests: compiles and steps in seconds on a CPU.

Run:
  python -m vqvdm_jax.main --config=configs/tiny.py --workdir=/tmp/tiny --mode=train_vqgan
"""

from vqvdm_jax.config import base_config


def get_config(arg: str | None = None):
  del arg
  config = base_config()
  config.data.name = "synthetic"
  config.data.num_frames = 8
  config.data.resolution = 16
  config.data.num_train_clips = 32
  config.data.num_eval_clips = 8

  model = config.vqgan.model
  model.channels = 8
  model.channel_multipliers = (1, 2, 2)
  model.num_res_blocks = 1
  model.temporal_downsample = 4
  model.spatial_downsample = 4
  model.num_groups = 2
  model.attention_at_lowest = True
  # XLA's own convolution: the tests are compile-bound, and it compiles the tiny stage-1 train
  # step ~30 % faster than 'auto' (temporal taps at these widths on CPU). tests/test_layers.py
  # proves the forms equal, value and gradients, and tests the 'auto' rule.
  model.conv_impl = "native"

  config.vqgan.quantizer.codebook_size = 32
  config.vqgan.loss.lpips_frames = 1
  # No LPIPS term in the tiny train step: VGG16 in it costs ~25 % of every stage-1 compile. The
  # tests that need the term (sharded step, the stage-1 options) set the weight back to 1.
  config.vqgan.loss.lpips_weight = 0.0
  config.vqgan.loss.disc_start = 2
  config.vqgan.discriminator.channels = 8
  config.vqgan.discriminator.num_layers = 2
  config.vqgan.optim.learning_rate = 1e-3
  config.vqgan.optim.warmup_steps = 1

  train = config.vqgan.train
  train.batch_size = 8
  train.num_steps = 4
  train.log_every = 2
  train.checkpoint_every = 2
  train.eval_every = 4
  train.num_eval_videos = 2
  config.vqgan.eval.num_clips = 8
  config.vqgan.eval.batch_size = 8

  unet = config.diffusion.unet
  unet.channels = 8
  unet.channel_multipliers = (1, 2)
  unet.num_res_blocks = 1
  unet.attention_levels = (1,)
  unet.num_heads = 2
  unet.num_groups = 2
  unet.conv_impl = "native"  # as the tokenizer's, for compile time
  config.diffusion.schedule.num_steps = 50
  # Ho et al.'s betas are for 1000 steps; scale them by 1000 / 50 so the chain still ends in noise.
  config.diffusion.schedule.beta_start = 2e-3
  config.diffusion.schedule.beta_end = 0.4
  config.diffusion.latents.encode_batch_size = 8
  config.diffusion.latents.scale_estimate_clips = 16
  config.diffusion.optim.learning_rate = 1e-3
  config.diffusion.optim.warmup_steps = 1
  config.diffusion.optim.ema_decay = 0.9
  dtrain = config.diffusion.train
  dtrain.batch_size = 8
  dtrain.num_steps = 4
  dtrain.log_every = 2
  dtrain.checkpoint_every = 2
  dtrain.sample_every = 0
  sample = config.diffusion.sample
  sample.num_steps = 5
  sample.guidance_scale = 2.0
  sample.num_videos = 4
  sample.batch_size = 4
  tmodel = config.transformer.model  # stage2='autoregressive' / 'masked'
  tmodel.width = 32
  tmodel.depth = 2
  tmodel.num_heads = 2
  tmodel.mlp_ratio = 2.0
  tmodel.dropout = 0.0
  config.transformer.optim.learning_rate = 3e-3
  config.transformer.optim.warmup_steps = 1
  config.transformer.optim.lr_decay = "constant"
  config.transformer.optim.ema_decay = 0.9
  ttrain = config.transformer.train
  ttrain.batch_size = 8
  ttrain.num_steps = 3
  ttrain.log_every = 1
  ttrain.checkpoint_every = 2
  config.transformer.sample.guidance_scale = 2.0
  config.transformer.sample.num_steps = 4
  # I3D runs at 16x224x224 whatever the clip size (~2 s a clip on 2 CPU cores): the tests that
  # need it turn it on for a handful of clips.
  config.evaluation.reconstruction_fvd = False
  config.evaluation.num_samples_fvd = 2
  config.evaluation.batch_size = 2
  return config
