"""The experiment configuration: defaults shared by every ``configs/*.py`` and its validation.

A config file calls :func:`base_config`, overrides what its experiment changes and returns it.
Every field a user may change lives here, once (clip length and resolution under ``data``,
read by both stages); code reads fields, never magic numbers.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import warnings
from collections.abc import Callable
from typing import TypeVar

import ml_collections

T = TypeVar("T")


def quantizer_config() -> ml_collections.ConfigDict:
  """The quantizer settings: ``vqgan.quantizer`` and, for a two-level tokenizer, the top
  level's ``vqgan.model.hierarchy.quantizer`` (same fields, same defaults)."""
  quantizer = ml_collections.ConfigDict()
  # 'vq' (codebook loss), 'ema' (VQ-VAE-2 EMA codebook), 'lfq' (MAGVIT-v2), 'fsq' (Mentzer et al.).
  quantizer.kind = "vq"
  quantizer.codebook_size = 16384  # ignored by 'lfq' (2 ** latent_channels codes).
  quantizer.codebook_init_stddev = 1.0  # N(0, s) init, on the scale of the encoder output.
  quantizer.beta = 0.25  # commitment weight (VQ-VDM eq. 2).
  quantizer.ema_decay = 0.99  # gamma of the VQ-VAE-2 EMA update.
  quantizer.ema_epsilon = 1e-5  # Laplace smoothing of the EMA cluster sizes.
  quantizer.dead_code_restart = False  # re-seed codes unused for `dead_code_steps` steps.
  quantizer.dead_code_steps = 200
  quantizer.usage_window = 100  # a code counts as used if chosen in the last N steps.
  quantizer.entropy_weight = 0.1  # lfq: weight of the entropy penalty.
  quantizer.entropy_weight_final = 0.1  # lfq: weight after annealing (= entropy_weight: none).
  quantizer.entropy_anneal_steps = 0  # lfq: linear annealing length (0: no annealing).
  quantizer.entropy_temperature = 0.01  # lfq: temperature of the soft code assignment.
  # fsq: values per latent channel (one entry per channel; prod = number of codes). (8, 5, 5, 5)
  # is the FSQ paper's 1,000-code choice for 4 channels.
  quantizer.fsq_levels = (8, 5, 5, 5)
  return quantizer


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the paper's settings (docs/paper.md) where the paper gives them, ours elsewhere."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---------------------------------------------------------------- data
  config.data = data = ml_collections.ConfigDict()
  data.name = "synthetic"  # 'synthetic' is the embedded moving-sprites dataset.
  data.num_frames = 16
  data.resolution = 128
  data.num_classes = 4  # synthetic: sprite shapes (square, disc, triangle, cross).
  data.fps_values = (4.0, 8.0, 16.0)  # synthetic: per-clip frame rates.
  data.sprite_size = 0.25  # synthetic: sprite side as a fraction of the frame (<= 0.5).
  data.num_train_clips = 2048  # synthetic: size of the train split.
  data.num_eval_clips = 64  # synthetic: size of the held-out split.
  data.num_workers = 0  # grain worker processes (0 = in the main process).
  data.prefetch_buffer_size = 2
  # Real datasets ('ucf101', 'sky_timelapse', 'video_folder'), prepared once with
  # `python -m vqvdm_jax.data.prepare` (README, "Real datasets").
  data.data_dir = ""  # where prepare wrote (its --data_dir); required for real datasets.
  data.short_side = 128  # which prepared variant to read (prepare's --short_side).
  data.split_number = 1  # ucf101: the official split, 1, 2 or 3 (prepare's --split_number).
  data.frame_stride = 1  # real data: a clip takes every n-th frame; its fps is divided by n.

  # ---------------------------------------------------------------- stage 1: 3D VQGAN
  config.vqgan = vqgan = ml_collections.ConfigDict()

  vqgan.model = model = ml_collections.ConfigDict()
  model.channels = 64  # width of the first level.
  model.channel_multipliers = (1, 2, 2, 4)  # one level per entry; a downsampling between levels.
  model.num_res_blocks = 2  # residual blocks per level.
  model.temporal_downsample = 4  # T -> T / 4   (a power of two)
  model.spatial_downsample = 8  # H, W -> H / 8 (a power of two)
  model.latent_channels = 4
  # Pixels folded into channels before the first conv (space-to-depth; the decoder unfolds them
  # after its last): p x p pixels are one position of the first level, which then runs at H / p.
  # Part of spatial_downsample (the convs downsample by spatial_downsample / p). 1: off.
  model.spatial_patch = 1
  # Residual autoencoding (DC-AE): the encoder adds each latent cell's mean colour to the
  # latent's first 3 channels and the decoder adds them back over the cell, so colours need not
  # be learned by the convolutions (which learn them last). Needs latent_channels >= 3.
  model.colour_shortcut = False
  model.attention_at_lowest = True  # self-attention block at the lowest resolution.
  model.attention_heads = 1
  model.num_groups = 16  # GroupNorm groups: 4 channels a group at 64 wide (Taming: 32 at 128).
  model.causal = False  # MAGVIT-v2 causal tokenizer: frame t never sees frames > t.
  # 'native' 3D conv, 'taps' (sum of 2D convs over time), 'im2col' (one matmul), 'auto' (per
  # layer by backend and shape: models.layers.resolve_conv_impl).
  model.conv_impl = "auto"
  model.dtype = "float32"  # compute dtype; parameters stay float32.
  # 'xla', 'cudnn' (fused flash attention: NVIDIA GPU, bfloat16/float16 dtype) or 'auto' (cuDNN
  # where it applies, XLA elsewhere); models/attention.py.
  model.attention_impl = "xla"
  model.remat = False  # rematerialise residual blocks: less activation memory, ~1/3 more compute.

  # VQ-VAE-2's two-level tokenizer (Razavi et al. 2019, Algorithm 1; models/hierarchy.py).
  # levels=2 adds a top latent, downsampled further by these factors from the bottom (the latent
  # above), with its own quantizer; the bottom encoder sees the upsampled quantized top and the
  # decoder reads both. Stage 2 models both levels: diffusion in one U-Net over the packed
  # latent, the token priors as the sequence [top codes; bottom codes] (priors/). 1: off.
  model.hierarchy = hierarchy = ml_collections.ConfigDict()
  hierarchy.levels = 1
  hierarchy.temporal_downsample = 2  # top latent frames = bottom latent frames / 2
  hierarchy.spatial_downsample = 2  # top latent side = bottom latent side / 2
  hierarchy.latent_channels = 4
  hierarchy.num_res_blocks = 1  # per level of the top encoder and top decoder.
  hierarchy.quantizer = quantizer_config()  # the top level's; every kind, as vqgan.quantizer

  vqgan.quantizer = quantizer_config()

  vqgan.loss = loss = ml_collections.ConfigDict()
  loss.l2_weight = 1.0
  loss.lpips_weight = 1.0
  loss.lpips_frames = 0  # LPIPS on this many random frames per clip (0: every frame).
  loss.vq_weight = 1.0  # lambda_1
  loss.disc_weight = 0.5  # lambda_2
  loss.feature_matching_weight = 1.0  # lambda_3
  loss.disc_start = 10000  # GAN terms (L_disc and L_disc_aux) are off before this step.
  loss.gan_loss = "vanilla"  # 'vanilla' (log D, docs/paper.md eq. 3) or 'hinge'.
  loss.adaptive_disc_weight = False  # Taming's gradient-norm ratio at the decoder's last layer.
  loss.adaptive_weight_max = 1e4
  loss.lecam_weight = 0.0  # LeCam regularisation of the discriminator (0: off).
  loss.lecam_ema_decay = 0.999

  vqgan.discriminator = disc = ml_collections.ConfigDict()
  disc.channels = 64
  disc.num_layers = 3  # each layer downsamples (stride 2) in time and space.

  vqgan.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-4
  optim.disc_learning_rate = 1e-4
  optim.b1 = 0.5
  optim.b2 = 0.9
  optim.weight_decay = 0.0
  optim.warmup_steps = 1000
  optim.lr_decay = "constant"  # after warm-up: "constant", or "cosine" to train.num_steps.
  optim.final_learning_rate_fraction = 0.0  # where 'cosine' ends, as a fraction of the peak.
  optim.grad_clip_norm = 1.0  # global-norm clipping (0: off).
  optim.ema_decay = 0.999  # EMA of the generator weights used for evaluation (0: off).

  vqgan.train = train = ml_collections.ConfigDict()
  train.batch_size = 8  # global batch, split over the mesh's data axis.
  train.num_steps = 200_000
  train.log_every = 50
  train.checkpoint_every = 2000
  train.keep_checkpoints = 3
  train.eval_every = 5000  # reconstructions written as GIF/MP4.
  train.num_eval_videos = 4

  vqgan.eval = ml_collections.ConfigDict()
  vqgan.eval.num_clips = 64
  vqgan.eval.batch_size = 8

  # ---------------------------------------------------------------- stage 2: latent diffusion
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.unet = unet = ml_collections.ConfigDict()
  unet.channels = 128
  unet.channel_multipliers = (1, 2, 4)  # down path halves H, W and multiplies channels.
  unet.num_res_blocks = 2
  unet.attention_levels = (0, 1, 2)  # levels whose blocks have spatial + temporal attention.
  unet.num_heads = 4
  unet.dropout = 0.0
  unet.num_groups = 32
  unet.conv_impl = "auto"
  unet.dtype = "float32"
  unet.attention_impl = "xla"  # as vqgan.model.attention_impl
  unet.remat = False  # rematerialise U-Net blocks: less activation memory, ~1/3 more compute.
  # Conditioning enters each residual block as a sum (the paper) or, with True, as the scale
  # and shift of its second GroupNorm (AdaGN, Dhariwal & Nichol 2021).
  unet.scale_shift_norm = False
  diffusion.use_class = True  # class conditioning (with a null label for guidance).
  diffusion.use_fps = True  # FPS embedding added to the timestep embedding (VQ-VDM eq. 6).
  diffusion.class_drop_rate = 0.5  # rho: probability of training with the null label.

  diffusion.schedule = schedule = ml_collections.ConfigDict()
  schedule.kind = "linear"  # 'linear' (Ho et al.) or 'cosine' (Nichol & Dhariwal).
  schedule.num_steps = 1000
  schedule.beta_start = 1e-4
  schedule.beta_end = 2e-2
  schedule.cosine_s = 0.008
  diffusion.prediction = "eps"  # 'eps' (Ho et al., the paper) or 'v' (Salimans & Ho).
  # 'uniform' (Ho et al.'s L_simple, the paper) or 'min_snr' (Hang et al. 2023, Min-SNR-γ).
  diffusion.loss_weighting = "uniform"
  diffusion.min_snr_gamma = 5.0

  diffusion.latents = latents = ml_collections.ConfigDict()
  latents.source = "quantized"  # 'quantized' (after the codebook) or 'encoder' (before it).
  latents.encode_batch_size = 16
  latents.scale_estimate_clips = 256  # clips whose latents set the scale factor (1 / std).
  # Subtract the per-channel mean of those clips before scaling (False: scale_by_std alone).
  latents.center = False

  diffusion.optim = doptim = ml_collections.ConfigDict()
  doptim.learning_rate = 1e-4
  doptim.b1 = 0.9
  doptim.b2 = 0.999
  doptim.weight_decay = 0.0
  doptim.warmup_steps = 1000
  doptim.lr_decay = "constant"  # after warm-up: "constant", or "cosine" to train.num_steps.
  doptim.final_learning_rate_fraction = 0.0  # where 'cosine' ends, as a fraction of the peak.
  doptim.grad_clip_norm = 1.0
  doptim.ema_decay = 0.9999  # EMA of the U-Net weights; sampling uses it.

  diffusion.train = dtrain = ml_collections.ConfigDict()
  dtrain.batch_size = 32
  dtrain.num_steps = 400_000
  dtrain.log_every = 100
  dtrain.checkpoint_every = 5000
  dtrain.keep_checkpoints = 3
  dtrain.sample_every = 20_000  # a small sample grid during training (0: never).

  diffusion.sample = sample = ml_collections.ConfigDict()
  sample.sampler = "ddpm"  # 'ddpm' (ancestral) or 'ddim'.
  sample.num_steps = 100  # sampling steps (respaced when < schedule.num_steps).
  sample.eta = 0.0  # DDIM stochasticity (0: deterministic).
  sample.guidance_scale = 1.0  # w of VQ-VDM eq. 9 (1: conditional model alone).
  # Timesteps [start, end) where w applies, 1 elsewhere (Kynkäänniemi et al. 2024); (): all.
  sample.guidance_interval = ()
  sample.label = -1  # class to sample; -1 cycles through every class.
  sample.fps = 16.0  # frame rate to condition on.
  sample.num_videos = 8
  sample.batch_size = 8
  sample.seed = 0
  sample.clip_x0 = 0.0  # clip predicted x0 to [-c, c] in scaled latent units (0: off).

  # ---------------------------------------------------------------- stage 2: the prior
  # 'diffusion' (VQ-VDM's latent DDPM above), or a transformer over the tokenizer's code indices:
  # 'autoregressive' (Taming / TATS) or 'masked' (MaskGIT / MAGVIT). Each trains in its own
  # folder (DIR/diffusion, DIR/autoregressive, DIR/masked) on the same tokenizer. The class and
  # FPS conditioning (diffusion.use_class, diffusion.use_fps) and what to sample
  # (diffusion.sample.label, fps, num_videos, batch_size, seed) are shared by all three.
  config.stage2 = "diffusion"

  # ---------------------------------------------------------------- stage 2: token transformers
  config.transformer = transformer = ml_collections.ConfigDict()
  transformer.model = tmodel = ml_collections.ConfigDict()
  tmodel.width = 1024  # TATS' GPT: 24 layers, 16 heads, 1024 wide (MaskGIT: 24, 16, 768).
  tmodel.depth = 24
  tmodel.num_heads = 16
  tmodel.mlp_ratio = 4.0
  tmodel.dropout = 0.1
  tmodel.dtype = "float32"  # compute dtype; parameters stay float32.
  tmodel.attention_impl = "xla"  # as vqgan.model.attention_impl
  tmodel.remat = False  # rematerialise blocks: less activation memory, ~1/3 more compute.
  # 'plain': one softmax over every code; 'channels': LFQ / FSQ codes as one digit per latent
  # channel, each with its own softmax (MAGVIT-v2's token factorisation); 'auto': channels when
  # LFQ / FSQ have more than 2^16 codes, else plain.
  tmodel.code_factorization = "auto"
  transformer.class_drop_rate = 0.1  # rho: probability of the null class (guidance on logits).

  transformer.optim = toptim = ml_collections.ConfigDict()
  toptim.learning_rate = 3e-4
  toptim.b1 = 0.9
  toptim.b2 = 0.95
  toptim.weight_decay = 0.01
  toptim.warmup_steps = 5000
  toptim.lr_decay = "cosine"
  toptim.final_learning_rate_fraction = 0.1
  toptim.grad_clip_norm = 1.0
  toptim.ema_decay = 0.9999  # EMA of the weights; sampling uses it (0: off).

  transformer.train = ttrain = ml_collections.ConfigDict()
  ttrain.batch_size = 32
  ttrain.num_steps = 400_000
  ttrain.log_every = 100
  ttrain.checkpoint_every = 5000
  ttrain.keep_checkpoints = 3

  transformer.sample = tsample = ml_collections.ConfigDict()
  tsample.guidance_scale = 1.0  # logits = uncond + w (cond - uncond); 1: conditional alone.
  tsample.temperature = 1.0  # softmax temperature of each sampled code (0: argmax).
  tsample.top_k = 0  # autoregressive: keep the k most likely codes (0: all).
  tsample.top_p = 1.0  # autoregressive: nucleus sampling (1: off).
  tsample.num_steps = 12  # masked: parallel decoding steps N (MAGVIT's 12).
  tsample.choice_temperature = 4.5  # masked: Gumbel noise on confidences, annealed to 0.
  tsample.prompt_frames = 0  # latent frames taken from a given clip (video continuation).
  # Latent frames to generate (0: the trained clip's); more are drawn by a sliding window over
  # the last t - 1 frames (Taming, TATS), so videos longer than the training clips.
  tsample.num_latent_frames = 0

  # ---------------------------------------------------------------- run safety
  config.run = run = ml_collections.ConfigDict()
  run.max_nonfinite_skips = 20  # stop after this many consecutive skipped (non-finite) updates.
  run.async_checkpoints = True  # write checkpoints in the background while training goes on.
  # --mode=train only, one process: a wall-clock budget for both stages and the samples, in
  # minutes (0: none). A stage whose measured steps/s would run past its deadline stops early,
  # at the last step that fits (training/loop.py, "Time budget"); later runs with a budget keep
  # that stop, and a run with 0 trains on to num_steps.
  run.time_budget_minutes = 0.0
  run.stage1_time_share = 0.4  # of the budget, what stage 1 may use, counted from the start.

  # ---------------------------------------------------------------- evaluation (FVD, KVD, IS)
  # The I3D/C3D protocol itself (16 frames, 224x224, logits) is pinned in vqvdm_jax/evaluation,
  # not configurable; these fields choose sample counts, weights and where caches live.
  config.evaluation = evaluation = ml_collections.ConfigDict()
  evaluation.num_samples_fvd = 2048  # generated (and as many real) clips for FVD and KVD.
  evaluation.num_samples_is = 10_000  # generated clips for the Inception Score (C3D).
  evaluation.is_splits = 10
  evaluation.c3d_weights = ""  # C3D .npz (format: vqvdm_jax/evaluation/c3d.py); "" skips IS.
  evaluation.batch_size = 16  # clips per I3D/C3D call in --mode=evaluate, split over devices.
  evaluation.reference_split = "train"  # real clips whose I3D features FVD compares against.
  evaluation.reference_dir = ""  # reference-feature cache ("": ~/.cache/vqvdm_jax/reference).
  evaluation.reconstruction_fvd = True  # evaluate_vqgan: rFVD of reconstructions vs originals.
  evaluation.seed = 0  # sampling seed of the evaluated videos.

  # ---------------------------------------------------------------- devices
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.shape = (-1, 1)  # devices per axis; -1 takes every remaining device.
  mesh.axes = ("data", "fsdp")  # the batch is split over both axes.
  mesh.param_sharding = "replicated"  # or 'fsdp': params/optimizer/EMA split along 'fsdp'.
  mesh.fsdp_min_size = 4096  # arrays with fewer elements stay replicated under 'fsdp'.
  return config


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """big_vision's ``:runlocal`` variant: the same model, a few steps on the embedded data."""
  config.data.name = "synthetic"
  config.data.num_classes = 4
  config.data.num_workers = 0
  for stage in (config.vqgan.train, config.diffusion.train, config.transformer.train):
    stage.batch_size = 2
    stage.num_steps = 3
    stage.log_every = 1
  config.vqgan.loss.disc_start = 1
  sample = config.diffusion.sample
  sample.num_steps, sample.num_videos, sample.batch_size = 2, 2, 2
  return config


_DATASETS = ("synthetic", "ucf101", "sky_timelapse", "video_folder")
_CONV_IMPLS = ("auto", "native", "taps", "im2col")  # models.layers.CONV_IMPLS
_QUANTIZERS = ("vq", "ema", "lfq", "fsq")
_GAN_LOSSES = ("vanilla", "hinge")
_DTYPES = ("float32", "bfloat16", "float16")
# jax.nn.dot_product_attention's kernels; models/attention.py resolves 'auto'.
ATTENTION_IMPLS = ("xla", "cudnn", "auto")
_SCHEDULES = ("linear", "cosine")
_PREDICTIONS = ("eps", "v")
_LOSS_WEIGHTINGS = ("uniform", "min_snr")
_LR_DECAYS = ("constant", "cosine")
_SAMPLERS = ("ddpm", "ddim")
_LATENT_SOURCES = ("quantized", "encoder")


class UserError(Exception):
  """A problem the user can fix (config, workdir, data); the entry point prints the message
  alone, without a traceback, and exits with status 2."""


class ConfigError(UserError, ValueError):
  """A config value is unknown or inconsistent; the message names the field and the fix."""


class MissingCheckpointError(UserError, FileNotFoundError):
  """A workdir lacks what a mode needs (a record, a stage's checkpoint); says how to make it."""


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def _is_power_of_two(value: int) -> bool:
  return value >= 1 and (value & (value - 1)) == 0


def _validate_attention_impl(group: ml_collections.ConfigDict, prefix: str) -> None:
  """What the config alone decides; the device and head-size checks come when the model is built."""
  _require(group.attention_impl in ATTENTION_IMPLS, f"{prefix}.attention_impl",
           f"got {group.attention_impl!r}; choose one of {ATTENTION_IMPLS}.")
  _require(group.attention_impl != "cudnn" or group.dtype in ("bfloat16", "float16"),
           f"{prefix}.attention_impl",
           f"'cudnn' (cuDNN flash attention) runs in bfloat16 or float16 only, but "
           f"{prefix}.dtype={group.dtype!r}; set --config.{prefix}.dtype=bfloat16, or "
           f"attention_impl='auto' (cuDNN where it applies, XLA elsewhere).")


# GroupNorm normalises each group of channels over the whole clip, so a per-clip constant (a flat
# background colour) survives only as the pattern across a group's channels: with two channels
# per group it collapses to a sign. The demo tokenizer could not learn background colours at
# 2 channels per group and did at 8 (benchmarks/RESULTS.md).
MIN_CHANNELS_PER_GROUP = 4


def _warn_if_groups_are_narrow(channels: int, num_groups: int, prefix: str) -> None:
  per_group = channels / min(num_groups, channels)
  if per_group < MIN_CHANNELS_PER_GROUP:
    warnings.warn(
        f"config.{prefix}.num_groups={num_groups} leaves {per_group:g} channels per GroupNorm "
        f"group at the first level ({prefix}.channels={channels}); below "
        f"{MIN_CHANNELS_PER_GROUP}, normalisation erases per-clip constants such as a flat "
        f"background colour and the model learns them slowly or not at all. Use "
        f"--config.{prefix}.num_groups={max(1, channels // MIN_CHANNELS_PER_GROUP)} or fewer.",
        stacklevel=3)


def _validate_optim(optim: ml_collections.ConfigDict, prefix: str) -> None:
  _require(optim.lr_decay in _LR_DECAYS, f"{prefix}.lr_decay",
           f"got {optim.lr_decay!r}; choose one of {_LR_DECAYS}.")
  _require(0.0 <= optim.final_learning_rate_fraction <= 1.0,
           f"{prefix}.final_learning_rate_fraction",
           f"must be in [0, 1], got {optim.final_learning_rate_fraction}.")


_VALIDATED: set[str] = set()  # configs (as JSON) already checked in this process


def validate(config: ml_collections.ConfigDict) -> None:
  """Fails at start-up, naming the field and the fix, on values the code cannot run with.

  Every entry point calls it (the CLI, the trainers, loading); each distinct config is checked
  and warned about once per process.
  """
  key = config_key(config)
  if key in _VALIDATED:
    return
  _check(config)
  _VALIDATED.add(key)


class _Unkeyed:
  """Carries a value through ``functools.lru_cache`` without being part of the key."""

  __slots__ = ("value",)

  def __init__(self, value):
    self.value = value

  def __hash__(self) -> int:
    return 0

  def __eq__(self, other) -> bool:
    return isinstance(other, _Unkeyed)


_PER_CONFIG_CACHES: list = []


def per_config(function: Callable[..., T] | None = None, *, copies: bool = True,
               ignoring: tuple[str, ...] | Callable[[ml_collections.ConfigDict],
                                                     tuple[str, ...]] = ()):
  """``function(config, *args)``, computed once per process for each config content and args.

  For what a config alone determines and costs seconds to build. Shape evaluations:
  ``jax.eval_shape`` of a model's init traces the whole model (~0.3-1 s of CPU for a small
  one), and a loader, a trainer, a latent cache and a sampler of one config all ask for the same
  shapes. Jitted programs (``copies=False``): a second trainer or sampler of a config reuses the
  first one's compiled step instead of tracing, lowering and compiling (or loading) it again,
  5-30 s on a CPU. The key is the config's JSON (an edited config is a new entry) less the
  dotted fields or sections in ``ignoring`` (fields ``function`` never reads: a config that
  differs only there gets the first one's result; or a function of the config that names
  them), and the other arguments (hashable: a mesh, a
  shape, a module). With ``copies`` each caller gets its own deep copy of the result; without,
  every caller shares it (for immutable results).
  """
  if function is None:
    return functools.partial(per_config, copies=copies, ignoring=ignoring)

  @functools.lru_cache(maxsize=64)
  def cached(key: str, config: _Unkeyed, *args, **kwargs):
    del key
    return function(config.value, *args, **kwargs)

  _PER_CONFIG_CACHES.append(cached)

  @functools.wraps(function)
  def wrapper(config: ml_collections.ConfigDict, *args, **kwargs):
    fields = ignoring(config) if callable(ignoring) else ignoring
    result = cached(config_key(config, fields), _Unkeyed(config), *args, **kwargs)
    return copy.deepcopy(result) if copies else result

  return wrapper


def config_key(config: ml_collections.ConfigDict, ignoring: tuple[str, ...] = ()) -> str:
  """The config's content as sorted JSON, without the dotted fields or sections ``ignoring``
  names (each must exist: a renamed field would otherwise silently stop being ignored)."""
  content = json.loads(config.to_json_best_effort())
  for path in ignoring:
    *parents, leaf = path.split(".")
    node = content
    for parent in parents:
      node = node[parent]
    del node[leaf]
  return json.dumps(content, sort_keys=True)


def clear_per_config_caches() -> None:
  """Forgets every :func:`per_config` result, for code that swaps out a function the cached
  programs were traced with (tests that monkeypatch a loss, say)."""
  for cached in _PER_CONFIG_CACHES:
    cached.cache_clear()


def _check(config: ml_collections.ConfigDict) -> None:
  data, model = config.data, config.vqgan.model
  _require(config.run.time_budget_minutes >= 0, "run.time_budget_minutes",
           f"must be >= 0 (0: no budget), got {config.run.time_budget_minutes}.")
  _require(0 < config.run.stage1_time_share < 1, "run.stage1_time_share",
           f"must be between 0 and 1 (a fraction of the budget), got "
           f"{config.run.stage1_time_share}.")
  _require(data.num_frames >= 1, "data.num_frames", f"must be >= 1, got {data.num_frames}.")
  _require(data.resolution >= 1, "data.resolution", f"must be >= 1, got {data.resolution}.")
  _validate_real_data(data)
  _require(model.conv_impl in _CONV_IMPLS, "vqgan.model.conv_impl",
           f"got {model.conv_impl!r}; choose one of {_CONV_IMPLS}.")
  _require(model.dtype in _DTYPES, "vqgan.model.dtype",
           f"got {model.dtype!r}; choose one of {_DTYPES}.")
  _validate_attention_impl(model, "vqgan.model")
  _warn_if_groups_are_narrow(model.channels, model.num_groups, "vqgan.model")
  for axis in ("temporal_downsample", "spatial_downsample"):
    factor = model[axis]
    _require(_is_power_of_two(factor), f"vqgan.model.{axis}",
             f"must be a power of two, got {factor}.")
  patch = model.spatial_patch
  _require(_is_power_of_two(patch) and model.spatial_downsample % patch == 0,
           "vqgan.model.spatial_patch",
           f"must be a power of two that divides vqgan.model.spatial_downsample="
           f"{model.spatial_downsample} (the pixels it folds are part of that factor), "
           f"got {patch}.")
  if model.colour_shortcut:
    _require(model.latent_channels >= 3, "vqgan.model.colour_shortcut",
             f"adds the mean colour to the latent's first 3 channels, but "
             f"vqgan.model.latent_channels={model.latent_channels}; use 3 or more, or turn it off.")
    _require(model.hierarchy.levels == 1, "vqgan.model.colour_shortcut",
             "is for the one-level tokenizer; set --config.vqgan.model.colour_shortcut=False with "
             "vqgan.model.hierarchy.levels=2.")
  num_downsamplings = max(int(math.log2(model.temporal_downsample)),
                          int(math.log2(model.spatial_downsample // patch)))
  folded = f" after folding {patch}x{patch} pixels (spatial_patch)" if patch > 1 else ""
  _require(len(model.channel_multipliers) == num_downsamplings + 1,
           "vqgan.model.channel_multipliers",
           f"has {len(model.channel_multipliers)} levels but downsampling by "
           f"{model.temporal_downsample} (time) and {model.spatial_downsample} (space){folded} "
           f"needs {num_downsamplings + 1} (one level per factor of two, plus one).")
  _require(model.num_res_blocks >= 0, "vqgan.model.num_res_blocks",
           f"must be >= 0, got {model.num_res_blocks}.")
  _require(data.resolution % model.spatial_downsample == 0, "data.resolution",
           f"{data.resolution} is not divisible by vqgan.model.spatial_downsample="
           f"{model.spatial_downsample}; pick a multiple of it.")
  if model.causal:
    _require(data.num_frames == 1 or (data.num_frames - 1) % model.temporal_downsample == 0,
             "data.num_frames",
             f"{data.num_frames} frames with the causal tokenizer: the first frame is encoded "
             f"alone, so use 1 + k * vqgan.model.temporal_downsample frames "
             f"(e.g. {1 + 4 * model.temporal_downsample}) or 1.")
  else:
    _require(data.num_frames % model.temporal_downsample == 0, "data.num_frames",
             f"{data.num_frames} is not divisible by vqgan.model.temporal_downsample="
             f"{model.temporal_downsample}; use a multiple of it (the paper uses 16).")
  _validate_optim(config.vqgan.optim, "vqgan.optim")
  _validate_quantizer(config.vqgan.quantizer, model.latent_channels, "vqgan.quantizer",
                      "vqgan.model.latent_channels")
  _validate_hierarchy(config)
  _require(config.vqgan.loss.gan_loss in _GAN_LOSSES, "vqgan.loss.gan_loss",
           f"got {config.vqgan.loss.gan_loss!r}; choose one of {_GAN_LOSSES}.")
  _require(config.vqgan.loss.lpips_frames >= 0, "vqgan.loss.lpips_frames",
           f"must be >= 0 (0: every frame), got {config.vqgan.loss.lpips_frames}.")
  train = config.vqgan.train
  _require(train.batch_size >= 1, "vqgan.train.batch_size",
           f"must be >= 1, got {train.batch_size}.")
  for field in ("num_steps", "log_every", "checkpoint_every", "eval_every"):
    _require(train[field] >= 1, f"vqgan.train.{field}", f"must be >= 1, got {train[field]}.")
  _validate_diffusion(config)
  _validate_transformer(config)
  _validate_evaluation(config)
  _require(len(config.mesh.shape) == len(config.mesh.axes), "mesh.shape",
           f"{tuple(config.mesh.shape)} and mesh.axes {tuple(config.mesh.axes)} differ in length.")
  _require("data" in config.mesh.axes, "mesh.axes",
           f"must contain 'data' (the batch axis), got {tuple(config.mesh.axes)}.")
  _require(set(config.mesh.axes) <= {"data", "fsdp"}, "mesh.axes",
           f"may only name 'data' and 'fsdp', got {tuple(config.mesh.axes)}.")
  _require(config.mesh.param_sharding in ("replicated", "fsdp"), "mesh.param_sharding",
           f"must be 'replicated' or 'fsdp', got {config.mesh.param_sharding!r}.")
  _require(config.mesh.param_sharding == "replicated" or "fsdp" in config.mesh.axes,
           "mesh.param_sharding", "is 'fsdp' but mesh.axes has no 'fsdp' axis.")


def _validate_quantizer(quantizer: ml_collections.ConfigDict, latent_channels: int, prefix: str,
                        channels_field: str) -> None:
  """One level's quantizer: ``prefix`` names its group, ``channels_field`` its latent width."""
  _require(quantizer.kind in _QUANTIZERS, f"{prefix}.kind",
           f"got {quantizer.kind!r}; choose one of {_QUANTIZERS}.")
  if quantizer.kind == "lfq":
    _require(latent_channels <= 16, channels_field,
             f"LFQ has 2 ** latent_channels codes; {latent_channels} is too many (max 16).")
  elif quantizer.kind == "fsq":
    levels = tuple(quantizer.fsq_levels)
    _require(len(levels) == latent_channels, f"{prefix}.fsq_levels",
             f"needs one level count per latent channel: {len(levels)} given for "
             f"{channels_field}={latent_channels}.")
    _require(all(int(level) == level and level >= 2 for level in levels),
             f"{prefix}.fsq_levels", f"each entry must be an integer >= 2, got {levels}.")
    _require(math.prod(levels) < 2**31, f"{prefix}.fsq_levels",
             f"{levels} make {math.prod(levels)} codes; indices are int32, keep the product "
             f"below 2**31.")
  else:
    _require(quantizer.codebook_size >= 2, f"{prefix}.codebook_size",
             f"must be >= 2, got {quantizer.codebook_size}.")
  _require(0.0 <= quantizer.ema_decay < 1.0, f"{prefix}.ema_decay",
           f"must be in [0, 1), got {quantizer.ema_decay}.")


def _validate_hierarchy(config: ml_collections.ConfigDict) -> None:
  """VQ-VAE-2's top level: its factors must divide the bottom latent, and what runs on it."""
  model = config.vqgan.model
  hierarchy = model.hierarchy
  _require(hierarchy.levels in (1, 2), "vqgan.model.hierarchy.levels",
           f"must be 1 (one latent) or 2 (VQ-VAE-2's top and bottom), got {hierarchy.levels}.")
  if hierarchy.levels == 1:
    return
  prefix = "vqgan.model.hierarchy"
  for axis in ("temporal_downsample", "spatial_downsample"):
    _require(_is_power_of_two(hierarchy[axis]), f"{prefix}.{axis}",
             f"must be a power of two, got {hierarchy[axis]}.")
  _require(max(hierarchy.temporal_downsample, hierarchy.spatial_downsample) >= 2,
           f"{prefix}.spatial_downsample",
           "the top level must be coarser than the bottom: downsample time or space by >= 2.")
  _require(not model.causal, "vqgan.model.causal",
           "the two-level tokenizer is not causal (its top level pools frames together); set "
           "--config.vqgan.model.causal=False or --config.vqgan.model.hierarchy.levels=1.")
  bottom_frames = config.data.num_frames // model.temporal_downsample
  bottom_side = config.data.resolution // model.spatial_downsample
  _require(bottom_frames % hierarchy.temporal_downsample == 0, f"{prefix}.temporal_downsample",
           f"{hierarchy.temporal_downsample} does not divide the bottom latent's {bottom_frames} "
           f"frames; use a divisor of it (1 keeps time at the bottom's rate).")
  _require(bottom_side % hierarchy.spatial_downsample == 0, f"{prefix}.spatial_downsample",
           f"{hierarchy.spatial_downsample} does not divide the bottom latent's side "
           f"{bottom_side}; use a divisor of it.")
  _require(hierarchy.latent_channels >= 1, f"{prefix}.latent_channels",
           f"must be >= 1, got {hierarchy.latent_channels}.")
  _require(hierarchy.num_res_blocks >= 1, f"{prefix}.num_res_blocks",
           f"must be >= 1, got {hierarchy.num_res_blocks}.")
  _validate_quantizer(hierarchy.quantizer, hierarchy.latent_channels, f"{prefix}.quantizer",
                      f"{prefix}.latent_channels")
  if config.stage2 == "diffusion":
    return
  # The token priors model [top codes; bottom codes] (priors/): whole clips only.
  sample = config.transformer.sample
  for field, what in (("prompt_frames", "given latent frames (video continuation)"),
                      ("num_latent_frames", "a sliding window past the trained clip")):
    _require(sample[field] == 0, f"transformer.sample.{field}",
             f"{sample[field]}: {what} is not supported by the {config.stage2} prior over a "
             f"two-level tokenizer (vqgan.model.hierarchy.levels=2), whose top codes span "
             f"several bottom frames; use 0, or a one-level tokenizer.")
  _require(config.transformer.model.code_factorization != "channels"
           or hierarchy.quantizer.kind in ("lfq", "fsq"),
           "transformer.model.code_factorization",
           f"'channels' splits LFQ or FSQ codes by latent channel; the top level's "
           f"vqgan.model.hierarchy.quantizer.kind={hierarchy.quantizer.kind!r} has a codebook: "
           f"use 'plain' or 'auto'.")


def _validate_real_data(data: ml_collections.ConfigDict) -> None:
  """Field checks only: whether the dataset is prepared is checked when a run opens it."""
  _require(data.name in _DATASETS, "data.name", f"got {data.name!r}; choose one of {_DATASETS}.")
  _require(data.frame_stride >= 1, "data.frame_stride", f"must be >= 1, got {data.frame_stride}.")
  _require(data.short_side >= 1, "data.short_side", f"must be >= 1, got {data.short_side}.")
  if data.name == "ucf101":
    _require(data.split_number in (1, 2, 3), "data.split_number",
             f"UCF-101 has official splits 1, 2 and 3, got {data.split_number}.")


def _validate_diffusion(config: ml_collections.ConfigDict) -> None:
  diffusion = config.diffusion
  unet = diffusion.unet
  _require(unet.conv_impl in _CONV_IMPLS, "diffusion.unet.conv_impl",
           f"got {unet.conv_impl!r}; choose one of {_CONV_IMPLS}.")
  _require(unet.dtype in _DTYPES, "diffusion.unet.dtype",
           f"got {unet.dtype!r}; choose one of {_DTYPES}.")
  _validate_attention_impl(unet, "diffusion.unet")
  _warn_if_groups_are_narrow(unet.channels, unet.num_groups, "diffusion.unet")
  latent_size = config.data.resolution // config.vqgan.model.spatial_downsample
  levels = len(unet.channel_multipliers)
  _require(latent_size % 2 ** (levels - 1) == 0, "diffusion.unet.channel_multipliers",
           f"{levels} levels halve the {latent_size}x{latent_size} latent {levels - 1} times; "
           f"use fewer levels or a larger data.resolution.")
  _require(all(0 <= level < levels for level in unet.attention_levels),
           "diffusion.unet.attention_levels",
           f"{tuple(unet.attention_levels)} names levels outside 0..{levels - 1}.")
  _require(unet.channels % unet.num_heads == 0, "diffusion.unet.num_heads",
           f"{unet.num_heads} heads do not divide diffusion.unet.channels={unet.channels}.")
  _require(diffusion.schedule.kind in _SCHEDULES, "diffusion.schedule.kind",
           f"got {diffusion.schedule.kind!r}; choose one of {_SCHEDULES}.")
  _require(diffusion.prediction in _PREDICTIONS, "diffusion.prediction",
           f"got {diffusion.prediction!r}; choose one of {_PREDICTIONS}.")
  _validate_optim(diffusion.optim, "diffusion.optim")
  _require(diffusion.loss_weighting in _LOSS_WEIGHTINGS, "diffusion.loss_weighting",
           f"got {diffusion.loss_weighting!r}; choose one of {_LOSS_WEIGHTINGS}.")
  _require(diffusion.min_snr_gamma > 0, "diffusion.min_snr_gamma",
           f"must be positive, got {diffusion.min_snr_gamma}.")
  _require(diffusion.sample.sampler in _SAMPLERS, "diffusion.sample.sampler",
           f"got {diffusion.sample.sampler!r}; choose one of {_SAMPLERS}.")
  _require(diffusion.latents.source in _LATENT_SOURCES, "diffusion.latents.source",
           f"got {diffusion.latents.source!r}; choose one of {_LATENT_SOURCES}.")
  _require(1 <= diffusion.sample.num_steps <= diffusion.schedule.num_steps,
           "diffusion.sample.num_steps",
           f"{diffusion.sample.num_steps} must be in 1..diffusion.schedule.num_steps="
           f"{diffusion.schedule.num_steps}.")
  interval = tuple(diffusion.sample.guidance_interval)
  _require(not interval or (len(interval) == 2
                            and 0 <= interval[0] < interval[1] <= diffusion.schedule.num_steps),
           "diffusion.sample.guidance_interval",
           f"got {interval}; use () for every step or (start, end) with "
           f"0 <= start < end <= diffusion.schedule.num_steps={diffusion.schedule.num_steps}.")
  _require(0.0 <= diffusion.class_drop_rate <= 1.0, "diffusion.class_drop_rate",
           f"must be a probability, got {diffusion.class_drop_rate}.")
  if diffusion.use_class:
    _require(config.data.num_classes >= 1, "diffusion.use_class",
             f"class conditioning needs labels, but data.num_classes={config.data.num_classes}; "
             f"set --config.diffusion.use_class=False.")
    _require(-1 <= diffusion.sample.label < config.data.num_classes, "diffusion.sample.label",
             f"{diffusion.sample.label} is not a class of 0..{config.data.num_classes - 1} "
             f"(or -1 for all classes).")
  dtrain = diffusion.train
  _require(dtrain.batch_size >= 1, "diffusion.train.batch_size",
           f"must be >= 1, got {dtrain.batch_size}.")
  for field in ("num_steps", "log_every", "checkpoint_every"):
    _require(dtrain[field] >= 1, f"diffusion.train.{field}", f"must be >= 1, got {dtrain[field]}.")
  for field in ("num_videos", "batch_size"):
    _require(diffusion.sample[field] >= 1, f"diffusion.sample.{field}",
             f"must be >= 1, got {diffusion.sample[field]}.")


STAGE2_PRIORS = ("diffusion", "autoregressive", "masked")


def _validate_transformer(config: ml_collections.ConfigDict) -> None:
  _require(config.stage2 in STAGE2_PRIORS, "stage2",
           f"got {config.stage2!r}; choose one of {STAGE2_PRIORS}.")
  transformer = config.transformer
  model = transformer.model
  _require(model.dtype in _DTYPES, "transformer.model.dtype",
           f"got {model.dtype!r}; choose one of {_DTYPES}.")
  _validate_attention_impl(model, "transformer.model")
  for field in ("width", "depth", "num_heads"):
    _require(model[field] >= 1, f"transformer.model.{field}", f"must be >= 1, got {model[field]}.")
  _require(model.width % model.num_heads == 0, "transformer.model.num_heads",
           f"{model.num_heads} heads do not divide transformer.model.width={model.width}.")
  _require(model.code_factorization in ("auto", "plain", "channels"),
           "transformer.model.code_factorization",
           f"got {model.code_factorization!r}; choose one of ('auto', 'plain', 'channels').")
  _require(model.code_factorization != "channels"
           or config.vqgan.quantizer.kind in ("lfq", "fsq"),
           "transformer.model.code_factorization",
           f"'channels' splits LFQ or FSQ codes by latent channel; vqgan.quantizer.kind="
           f"{config.vqgan.quantizer.kind!r} has a codebook: use 'plain' or 'auto'.")
  _require(0.0 <= model.dropout < 1.0, "transformer.model.dropout",
           f"must be in [0, 1), got {model.dropout}.")
  _require(0.0 <= transformer.class_drop_rate <= 1.0, "transformer.class_drop_rate",
           f"must be a probability, got {transformer.class_drop_rate}.")
  _validate_optim(transformer.optim, "transformer.optim")
  for field in ("batch_size", "num_steps", "log_every", "checkpoint_every"):
    _require(transformer.train[field] >= 1, f"transformer.train.{field}",
             f"must be >= 1, got {transformer.train[field]}.")
  sample = transformer.sample
  _require(sample.temperature >= 0, "transformer.sample.temperature",
           f"must be >= 0 (0: the most likely code), got {sample.temperature}.")
  _require(sample.top_k >= 0, "transformer.sample.top_k",
           f"must be >= 0 (0: every code), got {sample.top_k}.")
  _require(0.0 < sample.top_p <= 1.0, "transformer.sample.top_p",
           f"must be in (0, 1] (1: off), got {sample.top_p}.")
  _require(sample.num_steps >= 1, "transformer.sample.num_steps",
           f"must be >= 1, got {sample.num_steps}.")
  _require(sample.choice_temperature >= 0, "transformer.sample.choice_temperature",
           f"must be >= 0, got {sample.choice_temperature}.")
  frames, factor = config.data.num_frames, config.vqgan.model.temporal_downsample
  latent_frames = 1 + (frames - 1) // factor if config.vqgan.model.causal else frames // factor
  _require(0 <= sample.prompt_frames < max(latent_frames, 1), "transformer.sample.prompt_frames",
           f"{sample.prompt_frames} latent frames cannot be given: a clip has "
           f"{latent_frames}; use 0 (no prompt) up to {latent_frames - 1}.")
  _require(sample.num_latent_frames == 0 or (latent_frames >= 2
                                             and sample.num_latent_frames >= latent_frames),
           "transformer.sample.num_latent_frames",
           f"{sample.num_latent_frames}: use 0 (the trained {latent_frames}) or more, and a "
           f"sliding window needs clips of at least 2 latent frames.")


def _validate_evaluation(config: ml_collections.ConfigDict) -> None:
  evaluation = config.evaluation
  _require(evaluation.num_samples_fvd >= 2, "evaluation.num_samples_fvd",
           f"FVD and KVD need at least 2 clips, got {evaluation.num_samples_fvd}.")
  _require(evaluation.num_samples_is >= evaluation.is_splits >= 1, "evaluation.num_samples_is",
           f"{evaluation.num_samples_is} clips cannot fill evaluation.is_splits="
           f"{evaluation.is_splits} splits; use at least one clip per split.")
  _require(evaluation.batch_size >= 1, "evaluation.batch_size",
           f"must be >= 1, got {evaluation.batch_size}.")
  _require(evaluation.reference_split in ("train", "eval"), "evaluation.reference_split",
           f"got {evaluation.reference_split!r}; choose 'train' or 'eval'.")
