"""``--mode=evaluate_vqgan``: reconstruction quality of the latest stage-1 checkpoint.

Writes ``DIR/vqgan/eval/NNN/eval.json`` (PSNR, SSIM, LPIPS, rFVD, codebook usage and perplexity
over the held-out clips; on the embedded dataset also the sprite colour check: the mean L∞ error
of each clip's mean sprite colour and the fraction of clips within 0.1; for VQ-VAE-2's two-level
tokenizer also ``top_only/*`` and ``bottom_only/*`` PSNR, SSIM, LPIPS and colour check, decoded
with the other level's codes replaced by their batch mean, and the top level's
``top/codebook_*``; the log prints these as a table) and
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


def level_report(results: dict) -> str:
  """The full and per-level reconstruction metrics of a two-level evaluation as a table."""
  colour = "sprite_colour_pass" in results
  lines = [f"{'decoded from':<14}{'PSNR':>8}{'SSIM':>8}{'LPIPS':>8}" + ("  colour" if colour
                                                                       else "")]
  for label, prefix in (("both levels", ""), ("top only", "top_only/"),
                        ("bottom only", "bottom_only/")):
    line = (f"{label:<14}{results[prefix + 'psnr']:>8.2f}{results[prefix + 'ssim']:>8.3f}"
            f"{results[prefix + 'lpips']:>8.3f}")
    if colour:
      line += f"{100 * results[prefix + 'sprite_colour_pass']:>7.0f}%"
    lines.append(line)
  return "\n".join(lines)


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
  # The reconstructions measured, by metric-name prefix: the full one (the one-level names),
  # and for two levels also each level alone.
  prefixes = ("", *(f"{level}/" for level in LEVEL_RECONSTRUCTIONS)) if two_levels else ("",)

  def reconstruct(variables, video_uint8):
    """Each reconstruction clipped to [-1, 1] (float and uint8), its PSNR and SSIM per clip,
    and the code indices."""
    video = pipeline.to_model_input(video_uint8)
    if two_levels:  # VQ-VAE-2: also each level alone, the other's codes set to their mean
      levels = model.apply(variables, video, method="reconstruct_levels")
      decoded = [levels["both"], *(levels[level] for level in LEVEL_RECONSTRUCTIONS)]
      out = {"indices": levels["indices"], "top_indices": levels["top_indices"]}
    else:
      x_hat, quantized = model.apply(variables, video, train=False)
      decoded, out = [x_hat], {"indices": quantized.indices}
    for prefix, x_hat in zip(prefixes, decoded, strict=True):
      x_hat = jnp.clip(x_hat, -1.0, 1.0)
      out.update({f"{prefix}psnr": reconstruction.psnr(video, x_hat),
                  f"{prefix}ssim": reconstruction.ssim(video, x_hat),
                  f"{prefix}x_hat": x_hat, f"{prefix}x_hat_uint8": pipeline.to_uint8(x_hat)})
    return out

  def clip_lpips(lpips_params, video_uint8, x_hat):
    """LPIPS per clip (the mean over its frames) of a reconstruction in [-1, 1]."""
    video = pipeline.to_model_input(video_uint8)
    frames, frames_hat = (x.reshape((-1, *x.shape[2:])) for x in (video, x_hat))
    frame_lpips = losses.lpips_distance(lpips_module, lpips_params, frames, frames_hat)
    return frame_lpips.reshape(video.shape[:2]).mean(axis=1)

  # The weights as restored; clips in and metrics out replicated, so that every process (each
  # read the same clips) can read every result. VGG is a function of its own, compiled once
  # for all the reconstructions it compares (a two-level tokenizer has three).
  reconstruct = jax.jit(reconstruct, in_shardings=(
      jax.tree.map(lambda leaf: leaf.sharding, variables), replicated),
      out_shardings=replicated)
  clip_lpips = jax.jit(clip_lpips, in_shardings=replicated, out_shardings=replicated)

  eval_config = config.vqgan.eval
  per_clip = {f"{prefix}{name}": [] for prefix in prefixes for name in ("psnr", "ssim", "lpips")}
  all_indices, top_indices, originals, reconstructions = [], [], [], []
  with_rfvd = config.evaluation.reconstruction_fvd
  if with_rfvd:
    # I3D batches are the eval batches: no padding of a batch to a larger feature batch.
    extractor = features.i3d_extractor(sharding.make_mesh(config.mesh, devices),
                                       eval_config.batch_size)
  i3d_features = {"original": [], "reconstruction": []}
  with_colour = config.data.name == "synthetic"  # the colour check reads the sprites' colours
  colour_errors = {prefix: [] for prefix in prefixes}
  for batch in pipeline.eval_batches(config.data, eval_config.batch_size, eval_config.num_clips,
                                     config.seed):
    video = sharding.from_replicated_host_data(batch["video"], replicated)
    out = reconstruct(variables, video)
    for prefix in prefixes:
      out[f"{prefix}lpips"] = clip_lpips(lpips_params, video, out.pop(f"{prefix}x_hat"))
    out = jax.device_get(out)
    for name in per_clip:
      per_clip[name].append(np.asarray(out[name], np.float64))
    all_indices.append(np.asarray(out["indices"]))
    if two_levels:
      top_indices.append(np.asarray(out["top_indices"]))
    if with_colour:
      for prefix in prefixes:
        colour_errors[prefix].append(reconstruction.sprite_colour_error(
            batch["video"], np.asarray(out[f"{prefix}x_hat_uint8"])))
    x_hat = np.asarray(out["x_hat_uint8"])
    if with_rfvd:
      i3d_features["original"].append(extractor(batch["video"]))
      i3d_features["reconstruction"].append(extractor(x_hat))
    if len(originals) < 1:
      originals.append(batch["video"][:8])
      reconstructions.append(x_hat[:8])
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
    for prefix in prefixes:
      errors = np.concatenate(colour_errors[prefix])
      results.update({
          f"{prefix}sprite_colour_error": float(np.nanmean(errors)),
          f"{prefix}sprite_colour_pass": float(np.mean(errors <= reconstruction.COLOUR_TOLERANCE))})
    results["sprite_colour_tolerance"] = reconstruction.COLOUR_TOLERANCE
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
  if two_levels:
    logging.info("What each level carries (the other's codes at their batch mean):\n%s",
                 level_report(results))
  return results
