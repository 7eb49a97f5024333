"""``--mode=evaluate_vqgan``: reconstruction quality of the latest stage-1 checkpoint.

Writes ``DIR/vqgan/eval/NNN/eval.json`` (PSNR, SSIM, LPIPS, rFVD, codebook usage and perplexity
over the held-out clips; on the embedded dataset also the sprite colour check: the mean L∞ error
of each clip's mean sprite colour and the fraction of clips within 0.1; for VQ-VAE-2's two-level
tokenizer also ``top_only/*`` and ``bottom_only/*`` PSNR, SSIM and LPIPS, decoded with the other
level's codes replaced by their mean, and the top level's ``top/codebook_*``) and
``eval_grid.{gif,mp4}`` (originals above reconstructions) beside it, one numbered folder per
invocation.
rFVD is FVD (the I3D protocol of ``evaluation/i3d.py``) of reconstructions against their
originals; ``evaluation.reconstruction_fvd=False`` leaves it out.

On several processes (``jax.distributed``) every process reads the same clips, the metrics are
computed over the whole mesh and come back replicated, so each process ends with the same
numbers; process 0 alone writes the files.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from vqvdm_jax import fileio, losses, sharding, video_io
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.evaluation import features, i3d, metrics, reconstruction
from vqvdm_jax.inference.tokenizer import load_tokenizer
from vqvdm_jax.models import quantizers


def codebook_statistics(indices: np.ndarray, codebook_size: int) -> dict[str, float]:
  """Fraction of the codebook used and perplexity exp(H) of the code histogram."""
  counts = np.bincount(indices.reshape(-1), minlength=codebook_size).astype(np.float64)
  probabilities = counts / counts.sum()
  nonzero = probabilities[probabilities > 0]
  return {"codebook_usage": float((counts > 0).mean()),
          "codebook_perplexity": float(np.exp(-(nonzero * np.log(nonzero)).sum()))}


# A two-level tokenizer's reconstructions from one level alone, the other's codes replaced by
# their batch mean (models/hierarchy.py, reconstruct_levels): what each level carries.
LEVEL_RECONSTRUCTIONS = ("top_only", "bottom_only")


def codebook_size(config: ml_collections.ConfigDict) -> int:
  return quantizers.num_codes(config.vqgan.quantizer, config.vqgan.model.latent_channels)


def evaluate_vqgan(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
                   devices: list | None = None, out_dir: fileio.PathLike | None = None) -> dict:
  """Evaluates the latest checkpoint in ``workdir``; fails clearly when there is none.

  ``devices`` (default: all) carry the I3D network of rFVD. Writes ``eval.json`` and the grid
  into ``out_dir`` (default: a new ``DIR/vqgan/eval/NNN``: no evaluation overwrites another).
  """
  tokenizer = load_tokenizer(workdir, config=config)
  variables, model = tokenizer.variables, tokenizer.model
  replicated = jax.tree.leaves(variables)[0].sharding
  lpips_module, lpips_params = losses.load_lpips()
  lpips_params = jax.device_put(lpips_params, replicated)

  two_levels = config.vqgan.model.hierarchy.levels == 2

  def quality(video, x_hat, lpips_params):
    """PSNR, SSIM and LPIPS per clip of a reconstruction clipped to [-1, 1]."""
    frames, frames_hat = (x.reshape((-1, *x.shape[2:])) for x in (video, x_hat))
    frame_lpips = losses.lpips_distance(lpips_module, lpips_params, frames, frames_hat)
    return {"psnr": reconstruction.psnr(video, x_hat),
            "ssim": reconstruction.ssim(video, x_hat),
            "lpips": frame_lpips.reshape(video.shape[:2]).mean(axis=1)}

  def clip_metrics(variables, lpips_params, video_uint8):
    video = pipeline.to_model_input(video_uint8)
    if two_levels:  # VQ-VAE-2: also each level alone, the other's codes set to their mean
      levels = model.apply(variables, video, method="reconstruct_levels")
      x_hat, indices = levels["both"], levels["indices"]
      per_level = {f"{level}/{name}": value for level in LEVEL_RECONSTRUCTIONS
                   for name, value in quality(video, jnp.clip(levels[level], -1.0, 1.0),
                                              lpips_params).items()}
      per_level["top_indices"] = levels["top_indices"]
    else:
      x_hat, quantized = model.apply(variables, video, train=False)
      indices, per_level = quantized.indices, {}
    x_hat = jnp.clip(x_hat, -1.0, 1.0)
    return {**quality(video, x_hat, lpips_params), **per_level,
            "indices": indices, "x_hat": pipeline.to_uint8(x_hat)}

  # The weights as restored; clips in and metrics out replicated, so that every process (each
  # read the same clips) can read every result.
  clip_metrics = jax.jit(clip_metrics, in_shardings=(
      jax.tree.map(lambda leaf: leaf.sharding, variables), replicated,
      replicated), out_shardings=replicated)

  eval_config = config.vqgan.eval
  per_clip = {"psnr": [], "ssim": [], "lpips": []}
  if two_levels:
    per_clip.update({f"{level}/{name}": [] for level in LEVEL_RECONSTRUCTIONS
                     for name in ("psnr", "ssim", "lpips")})
  all_indices, top_indices, originals, reconstructions = [], [], [], []
  with_rfvd = config.evaluation.reconstruction_fvd
  if with_rfvd:
    # I3D batches are the eval batches: no padding of a batch to a larger feature batch.
    extractor = features.i3d_extractor(sharding.make_mesh(config.mesh, devices),
                                       eval_config.batch_size)
  i3d_features = {"original": [], "reconstruction": []}
  with_colour = config.data.name == "synthetic"  # the colour check reads the sprites' colours
  colour_errors = []
  for batch in pipeline.eval_batches(config.data, eval_config.batch_size, eval_config.num_clips,
                                     config.seed):
    video = sharding.from_replicated_host_data(batch["video"], replicated)
    out = jax.device_get(clip_metrics(variables, lpips_params, video))
    for name in per_clip:
      per_clip[name].append(np.asarray(out[name], np.float64))
    all_indices.append(np.asarray(out["indices"]))
    if two_levels:
      top_indices.append(np.asarray(out["top_indices"]))
    if with_colour:
      colour_errors.append(reconstruction.sprite_colour_error(batch["video"],
                                                              np.asarray(out["x_hat"])))
    if with_rfvd:
      i3d_features["original"].append(extractor(batch["video"]))
      i3d_features["reconstruction"].append(extractor(np.asarray(out["x_hat"])))
    if len(originals) < 1:
      originals.append(batch["video"][:8])
      reconstructions.append(np.asarray(out["x_hat"])[:8])
  results = {name: float(np.mean(np.concatenate(values))) for name, values in per_clip.items()}
  results.update(codebook_statistics(np.concatenate([i.reshape(-1) for i in all_indices]),
                                     codebook_size(config)))
  if two_levels:  # the bottom level keeps the one-level names; the top's are prefixed
    hierarchy = config.vqgan.model.hierarchy
    top_statistics = codebook_statistics(
        np.concatenate([i.reshape(-1) for i in top_indices]),
        quantizers.num_codes(hierarchy.quantizer, hierarchy.latent_channels))
    results.update({f"top/{name}": value for name, value in top_statistics.items()})
  results.update({"step": tokenizer.step,
                  "num_clips": int(sum(len(v) for v in per_clip["psnr"])),
                  "weights": "ema" if config.vqgan.optim.ema_decay > 0 else "raw",
                  "psnr_data_range": "[-1, 1] (2.0)"})
  if with_colour:
    errors = np.concatenate(colour_errors)
    results.update({"sprite_colour_error": float(np.nanmean(errors)),
                    "sprite_colour_pass": float(np.mean(errors <= reconstruction.COLOUR_TOLERANCE)),
                    "sprite_colour_tolerance": reconstruction.COLOUR_TOLERANCE})
  if with_rfvd:
    results["rfvd"] = metrics.frechet_video_distance(
        *(np.concatenate(i3d_features[key]) for key in ("original", "reconstruction")))
    results["rfvd_protocol"] = {**i3d.PROTOCOL,
                                "deviations": i3d.protocol_deviations(config.data.num_frames)}
  out_dir = epath.Path(out_dir) if out_dir else workdir_lib.new_output_dir(
      workdir_lib.vqgan_eval_dir(workdir))
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    video_io.write_comparison_grid(out_dir / "eval_grid", originals[0], reconstructions[0], fps=8)
  logging.info("Stage-1 evaluation at step %d: %s", results["step"], results)
  return results
