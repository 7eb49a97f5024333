r"""The embedded default: moving sprites, 8x32x32 clips, small enough to train on a 2-core CPU.

Run (stage 1, stage 2, then samples in /tmp/demo/samples):
  python -m vqvdm_jax.main --config=configs/demo.py --workdir=/tmp/demo
  python -m vqvdm_jax.main --config=configs/demo.py --workdir=/tmp/demo --mode=evaluate_vqgan

The variants ``:autoregressive`` and ``:masked`` select the token priors as stage 2 (same model
fields otherwise, so all three priors can train on one tokenizer in one workdir):
  python -m vqvdm_jax.main --config=configs/demo.py:masked --workdir=/tmp/demo --mode=train_prior

The variant ``:hierarchical`` is VQ-VAE-2's two-level tokenizer (a 1 x 4 x 4 top latent over the
2 x 8 x 8 bottom, each level with its own 256-code VQ) and the diffusion prior over both levels;
its model fields differ, so it trains in its own workdir:
  python -m vqvdm_jax.main --config=configs/demo.py:hierarchical --workdir=/tmp/demo_hierarchical
"""

from vqvdm_jax.config import base_config

VARIANTS = ("diffusion", "autoregressive", "masked", "hierarchical")


def get_config(arg: str | None = None):
  variant = arg or "diffusion"
  if variant not in VARIANTS:
    raise ValueError(f"configs/demo.py:{arg}: unknown variant; choose one of {VARIANTS}.")
  config = base_config()
  config.stage2 = "diffusion" if variant == "hierarchical" else variant
  config.data.name = "synthetic"
  # --mode=train ends within 15 minutes on a slow CPU too: a stage whose measured steps/s would
  # run past its share of 14 minutes stops early (and says so; training/loop.py, "Time budget").
  # On the 2-core AVX-512 CPU the whole run takes ~6 minutes and the budget never binds.
  config.run.time_budget_minutes = 14.0
  config.data.num_frames = 8
  config.data.resolution = 32
  config.data.num_train_clips = 1024
  config.data.num_eval_clips = 32
  # 13-pixel sprites: at 32x32 the default quarter-frame (8 px) square, disc, triangle and cross
  # differ by a few pixels, which a 4x spatial tokenizer blurs together.
  config.data.sprite_size = 0.4

  model = config.vqgan.model
  model.channels = 16
  model.channel_multipliers = (1, 2, 2)
  model.num_res_blocks = 1
  model.temporal_downsample = 4
  model.spatial_downsample = 4  # latent 2 x 8 x 8 x 4
  # 2 x 2 pixels folded into channels before the first conv: its level runs at 16 x 16, not
  # 32 x 32. A step costs ~0.45x, and 1,200 such steps score better than 600 unfolded ones on
  # every measure, in less time (19.7 dB, SSIM 0.71, LPIPS 0.27 against 18.6, 0.69, 0.29;
  # crosses come out as crosses, not diamonds: benchmarks/RESULTS.md, twelfth session).
  model.spatial_patch = 2
  # 8 channels per GroupNorm group: with 2 (num_groups = 8) the tokenizer could not learn the
  # clips' background colours (config.MIN_CHANNELS_PER_GROUP, benchmarks/RESULTS.md).
  model.num_groups = 2

  # Each latent cell's mean colour rides in the latent's first 3 channels and is spread back over
  # the cell by the decoder (DC-AE's residual autoencoding): without it, the convolutions learn
  # colour last, and after 1,200 steps every sprite came back whitish on a greyed background
  # (colour check 3 %). With it and 1,024 codes, backgrounds and sprites keep their colours
  # (benchmarks/RESULTS.md, thirteenth session).
  model.colour_shortcut = True
  # 1,024 codes of 4-d: the colour now takes part of each code, and with 256 the shapes blurred
  # (SSIM 0.65, LPIPS 0.30 against 0.66, 0.28 with 1,024).
  config.vqgan.quantizer.codebook_size = 1024
  config.vqgan.quantizer.dead_code_restart = True
  config.vqgan.quantizer.dead_code_steps = 50
  config.vqgan.loss.lpips_frames = 1
  # A short run: L2 with a light LPIPS term learns the sprites fastest; LPIPS at weight 1 held
  # the L2 loss above 0.1 for 350 steps. No adversarial phase (it starts after the run ends),
  # so the train step is built without the discriminator (its compile ~30 % shorter).
  config.vqgan.loss.lpips_weight = 0.1
  config.vqgan.loss.disc_start = 100_000
  config.vqgan.discriminator.channels = 16
  # Constant after warm-up: a cosine decay to 0 scored lower at 300 steps (FSQ 5^8: 17.0 dB at
  # peak 1e-3, 17.3 at 2e-3 without LPIPS, against 17.8 constant): the loss sits on the
  # mean-frame plateau and a decaying rate leaves it later (benchmarks/RESULTS.md, issue 18
  # continued).
  config.vqgan.optim.learning_rate = 1e-3
  config.vqgan.optim.disc_learning_rate = 2e-4
  config.vqgan.optim.warmup_steps = 50
  config.vqgan.optim.b1 = 0.9
  config.vqgan.optim.ema_decay = 0.99

  train = config.vqgan.train
  train.batch_size = 4
  train.num_steps = 1200
  train.log_every = 50
  train.checkpoint_every = 400
  train.eval_every = 400
  config.vqgan.eval.num_clips = 32
  config.vqgan.eval.batch_size = 8

  unet = config.diffusion.unet
  unet.channels = 32
  unet.channel_multipliers = (1, 2)
  unet.num_res_blocks = 1
  unet.attention_levels = (1,)
  unet.num_heads = 2
  unet.num_groups = 8
  # AdaGN: the class and timestep scale and shift each block's GroupNorm instead of being added.
  # On this tokenizer it raised the probe accuracy of samples from 0.49 to 0.72 (w = 4) and
  # from 0.56 to 0.85 (w = 6) at the same cost (benchmarks/RESULTS.md).
  unet.scale_shift_norm = True
  # rho = 0.1: with AdaGN, 0.2 left a sixth of the cross samples empty at w = 6; 0.1 keeps 97 %
  # of them visible at the same accuracy (benchmarks/RESULTS.md).
  config.diffusion.class_drop_rate = 0.1
  # v-prediction, not the paper's eps: these latents have per-channel means of -1 to +0.8 (in
  # scaled units), and an eps model learns them only through its high-noise loss, which is
  # ~100x smaller than the low-noise loss. After 1,000 steps its samples had invented pink
  # backgrounds and ignored the class; with v they match the data (benchmarks/RESULTS.md).
  config.diffusion.prediction = "v"
  config.diffusion.latents.scale_estimate_clips = 256
  config.diffusion.optim.learning_rate = 1e-3
  config.diffusion.optim.warmup_steps = 100
  config.diffusion.optim.ema_decay = 0.995
  dtrain = config.diffusion.train
  dtrain.batch_size = 16
  dtrain.num_steps = 2000
  dtrain.log_every = 100
  dtrain.checkpoint_every = 1000
  dtrain.sample_every = 0
  sample = config.diffusion.sample
  sample.sampler = "ddim"
  sample.num_steps = 50
  sample.guidance_scale = 6.0  # probe accuracy of samples: w=4 0.79, w=6 0.81, w=8 0.87
  sample.fps = 8.0
  sample.num_videos = 8
  sample.batch_size = 8

  # The token priors over the same 2 x 8 x 8 codes (128 tokens, 1,024 codes).
  tmodel = config.transformer.model
  tmodel.width = 128
  tmodel.depth = 4
  tmodel.num_heads = 4
  tmodel.dropout = 0.0
  toptim = config.transformer.optim
  toptim.learning_rate = 1e-3
  toptim.warmup_steps = 100
  toptim.weight_decay = 0.0
  toptim.ema_decay = 0.995
  ttrain = config.transformer.train
  ttrain.batch_size = 16
  ttrain.num_steps = 2000
  ttrain.log_every = 100
  ttrain.checkpoint_every = 1000
  config.transformer.sample.guidance_scale = 3.0

  if variant == "hierarchical":
    # VQ-VAE-2 (models/hierarchy.py): a top level at half the bottom's frames and side, its
    # quantizer set like the bottom's. Stage 2's one U-Net then sees 8 packed channels.
    hierarchy = model.hierarchy
    hierarchy.levels = 2
    hierarchy.temporal_downsample = 2
    hierarchy.spatial_downsample = 2  # top latent 1 x 4 x 4 x 4
    hierarchy.latent_channels = 4
    # As measured at two levels (benchmarks/RESULTS.md, issue 16): unfolded pixels, 256 codes
    # a level, no colour shortcut (one level only), 600 steps. The one-level demo's later
    # changes were not tried under a top level.
    config.vqgan.quantizer.codebook_size = 256
    hierarchy.quantizer = config.vqgan.quantizer.copy_and_resolve_references()
    model.spatial_patch = 1
    model.colour_shortcut = False
    train.num_steps, train.checkpoint_every, train.eval_every = 600, 200, 300
  return config
