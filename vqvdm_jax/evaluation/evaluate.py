"""``--mode=evaluate``: FVD, KVD and Inception Score of the latest stage-2 checkpoint's samples.

The protocol (Unterthiner et al. 2018 for FVD; VQ-VDM / TATS for the rest):

- N = ``evaluation.num_samples_fvd`` generated clips (2,048) against the I3D features of the
  first N clips of ``evaluation.reference_split``; generated class counts follow the reference
  clips' class distribution, and each class's FPS values cycle through the reference's.
- I3D: see :data:`vqvdm_jax.evaluation.i3d.PROTOCOL` (16 frames, 224x224 bilinear, [-1, 1],
  the 400 logits). FVD: Fréchet distance in float64. KVD: unbiased MMD² with the cubic
  polynomial kernel on the same features, unscaled.
- IS: C3D probabilities of ``evaluation.num_samples_is`` clips (10,000), 10 splits; only with
  ``evaluation.c3d_weights``, otherwise skipped and recorded as skipped.

The reference features are cached on disk, keyed by protocol, dataset and split, so they are
computed once per dataset. Everything lands in ``DIR/eval/results.json``.

On several processes (``jax.distributed``) every process derives the same seeded conditioning,
the processes sample and score each batch together over the whole mesh, and each ends with the
same numbers; process 0 alone reads and writes the cache and writes the results file.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vqvdm_jax import fileio
from vqvdm_jax import workdir as workdir_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.evaluation import c3d, features, i3d, metrics
from vqvdm_jax.inference.model import load
from vqvdm_jax.progress import Progress

KVD_PROTOCOL = {"kernel": "k(x, y) = (x.y / 400 + 1)^3 (KID's)",
                "estimator": "unbiased MMD^2 on all N x N clips (no subsets)",
                "scaling": "none: the raw MMD^2 (some papers report x1000 or x100; check first)"}
FVD_STATISTIC = ("Frechet distance between Gaussians fitted to the features (unbiased "
                 "covariance), float64, matrix square root via symmetric eigendecompositions")
# Loader knobs that do not change which clips a split holds.
_DATA_FIELDS_IGNORED = ("num_workers", "prefetch_buffer_size")


def reference_directory(config: ml_collections.ConfigDict) -> epath.Path:
  """``evaluation.reference_dir``, or beside the dataset when it has a directory, or ~/.cache.

  Any of them may be a gs:// URI.
  """
  if config.evaluation.reference_dir:
    return epath.Path(config.evaluation.reference_dir).expanduser()
  data_dir = config.data.get("data_dir", "")
  if data_dir:
    return epath.Path(data_dir).expanduser() / "reference_features"
  return epath.Path("~/.cache/vqvdm_jax/reference_features").expanduser()


def reference_key(config: ml_collections.ConfigDict, split: str, num_clips: int) -> dict:
  """Everything the cached reference features depend on: protocol, dataset, split, count."""
  data = {key: value for key, value in config.data.to_dict().items()
          if key not in _DATA_FIELDS_IGNORED}
  return {"protocol": i3d.PROTOCOL, "data": data, "data_seed": config.seed, "split": split,
          "num_clips": num_clips,
          "clips": "synthetic: the first num_clips; real data: the first num_clips videos of "
                   "a permutation seeded by data_seed, one seeded clip each"}


def reference_features(config: ml_collections.ConfigDict, extractor: features.FeatureExtractor,
                       num_clips: int) -> tuple[dict[str, np.ndarray], epath.Path]:
  """I3D features, labels and FPS of the reference clips: from the cache, or computed and cached.

  Returns ``({'features': [N, 400], 'labels': [N], 'fps': [N]}, cache path)``.
  """
  split = config.evaluation.reference_split
  key = reference_key(config, split, num_clips)
  key_json = json.dumps(key, sort_keys=True, default=str)
  digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
  path = reference_directory(config) / f"{config.data.name}_{split}_{num_clips}_{digest}.npz"
  # Only process 0 reads and writes the cache: other hosts may not see its directory (the default,
  # ~/.cache, is per machine). All must agree on a hit, since on a miss they extract together.
  cached = _read_reference_cache(path, key_json) if jax.process_index() == 0 else None
  if multihost_utils.broadcast_one_to_all(np.int32(cached is not None)):
    logging.info("Reference I3D features from the cache %s.", path)
    if cached is None:  # a template of the right shapes for the broadcast of process 0's arrays
      cached = {"features": np.zeros((num_clips, i3d.NUM_CLASSES), np.float32),
                "labels": np.zeros(num_clips, np.int32), "fps": np.zeros(num_clips, np.float32)}
    return multihost_utils.broadcast_one_to_all(cached), path
  logging.info("Computing I3D features of %d %s clips (once; cached at %s).", num_clips, split,
               path)
  progress = Progress(f"Evaluate, reference {split} clips", num_clips)
  collected = {"features": [], "labels": [], "fps": []}
  for batch in pipeline.ordered_batches(config.data, split, extractor.batch_size, num_clips,
                                        config.seed):
    collected["features"].append(extractor(batch["video"]))
    collected["labels"].append(np.asarray(batch["label"], np.int32))
    collected["fps"].append(np.asarray(batch["fps"], np.float32))
    progress.update(len(batch["video"]))
  reference = {name: np.concatenate(values) for name, values in collected.items()}
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.npz")
    fileio.save_npz(temporary, key=np.asarray(key_json), **reference)
    temporary.replace(path)  # atomic: a crash never leaves a half-written cache behind.
  return reference, path


def _read_reference_cache(path: epath.Path, key_json: str) -> dict[str, np.ndarray] | None:
  """The cached reference arrays when ``path`` holds features for exactly ``key_json``."""
  if not path.exists():
    return None
  with fileio.load_numpy(path) as cached:
    if str(cached["key"]) != key_json:
      return None
    return {"features": np.asarray(cached["features"], np.float32),
            "labels": np.asarray(cached["labels"], np.int32),
            "fps": np.asarray(cached["fps"], np.float32)}


def conditioning_like(labels: np.ndarray, fps: np.ndarray, num_samples: int,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Labels and FPS for ``num_samples`` videos whose class counts follow ``labels``' histogram.

  Counts are the largest-remainder rounding of the proportions; class c's FPS values cycle
  through the reference FPS of class c. The order is shuffled, so any prefix is a fair subset.
  """
  classes, counts = np.unique(labels, return_counts=True)
  quotas = counts * num_samples / counts.sum()
  allocation = np.floor(quotas).astype(int)
  leftover = num_samples - allocation.sum()
  allocation[np.argsort(-(quotas - allocation), kind="stable")[:leftover]] += 1
  out_labels = np.repeat(classes, allocation).astype(np.int32)
  out_fps = np.concatenate([np.resize(fps[labels == c], n) for c, n in zip(classes, allocation)])
  order = np.random.default_rng(seed).permutation(num_samples)
  return out_labels[order], out_fps[order].astype(np.float32)


def score_generated(video_batches: Iterator[np.ndarray], total: int,
                    i3d_extractor: features.FeatureExtractor, num_fvd: int,
                    c3d_extractor: features.FeatureExtractor | None, num_is: int
                    ) -> tuple[np.ndarray, np.ndarray | None]:
  """I3D features of the first ``num_fvd`` and C3D probabilities of the first ``num_is`` clips.

  Sampling and feature batches differ in size: clips are buffered so that the networks see full
  batches (only the last one is padded).
  """
  progress = Progress("Evaluate, generated clips", total)
  fake_features, probabilities, done = [], [], 0

  def score(videos: np.ndarray) -> None:
    nonlocal done
    if done < num_fvd:
      fake_features.append(i3d_extractor(videos[:num_fvd - done]))
    if done < num_is:
      probabilities.append(c3d_extractor(videos[:num_is - done]))
    done += len(videos)

  pending = None
  for videos in video_batches:
    pending = videos if pending is None else np.concatenate([pending, videos])
    full = len(pending) - len(pending) % i3d_extractor.batch_size
    if full:
      score(pending[:full])
      pending = pending[full:]
    progress.update(len(videos))
  if pending is not None and len(pending):
    score(pending)
  return (np.concatenate(fake_features),
          np.concatenate(probabilities) if probabilities else None)


def _load_c3d(config: ml_collections.ConfigDict, mesh) -> features.FeatureExtractor | None:
  path = config.evaluation.c3d_weights
  if not path:
    logging.warning(
        "Inception Score skipped: no C3D weights. Set --config.evaluation.c3d_weights=FILE.npz "
        "(the UCF-101 fine-tuned C3D; format and conversion in vqvdm_jax/evaluation/c3d.py).")
    return None
  module, variables = c3d.load(path)
  return features.FeatureExtractor(c3d.make_probabilities_fn(module), variables, mesh,
                                   config.evaluation.batch_size)


def protocol(config: ml_collections.ConfigDict, num_frames: int) -> dict[str, Any]:
  """The protocol fields of every results file."""
  return {"fvd": {**i3d.PROTOCOL, "statistic": FVD_STATISTIC},
          "kvd": {**i3d.PROTOCOL, **KVD_PROTOCOL},
          "inception_score": {**c3d.PROTOCOL, "splits": int(config.evaluation.is_splits)},
          "deviations": i3d.protocol_deviations(num_frames)}


def evaluate(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
             devices: list | None = None, out_dir: fileio.PathLike | None = None
             ) -> dict[str, Any]:
  """Samples from the latest checkpoints of ``workdir``, scores them, writes ``results.json``
  into ``out_dir`` (default: a new ``DIR/eval/NNN``)."""
  started = time.perf_counter()
  evaluation = config.evaluation
  model = load(workdir, config=config, devices=devices)
  mesh = model.mesh
  i3d_extractor = features.i3d_extractor(mesh, evaluation.batch_size)
  c3d_extractor = _load_c3d(config, mesh)
  num_fvd = evaluation.num_samples_fvd
  num_is = evaluation.num_samples_is if c3d_extractor else 0
  reference, cache_path = reference_features(config, i3d_extractor, num_fvd)

  # The FVD set follows the reference's classes exactly; extra clips for IS follow it too.
  labels, fps = conditioning_like(reference["labels"], reference["fps"], num_fvd, evaluation.seed)
  if num_is > num_fvd:
    extra = conditioning_like(reference["labels"], reference["fps"], num_is - num_fvd,
                              evaluation.seed + 1)
    labels, fps = np.concatenate([labels, extra[0]]), np.concatenate([fps, extra[1]])
  if not config.diffusion.use_class:
    labels = np.zeros_like(labels)
  logging.info("Evaluating %d generated clips (FVD/KVD on %d, IS on %d).", len(labels), num_fvd,
               num_is)
  fake_features, probabilities = score_generated(
      model.generate_batches(labels, fps, evaluation.seed),
      len(labels), i3d_extractor, num_fvd, c3d_extractor, num_is)

  results: dict[str, Any] = {
      "fvd": metrics.frechet_video_distance(reference["features"], fake_features),
      "kvd": metrics.kernel_distance(reference["features"], fake_features),
      "inception_score": None, "inception_score_std": None}
  if c3d_extractor is None:
    results["inception_score_skipped"] = ("no C3D weights (config.evaluation.c3d_weights is "
                                          "empty); see vqvdm_jax/evaluation/c3d.py")
  else:
    score, spread = metrics.inception_score(probabilities, evaluation.is_splits)
    results.update(inception_score=score, inception_score_std=spread,
                   c3d_weights=str(evaluation.c3d_weights))
  classes, counts = np.unique(labels[:num_fvd], return_counts=True)
  results.update({
      "num_samples_fvd": int(num_fvd), "num_reference_clips": int(len(reference["features"])),
      "num_samples_is": int(num_is),
      "checkpoint_step": model.step, "tokenizer_step": model.tokenizer.step,
      **model.sampling_settings(), "seed": int(evaluation.seed), "weights": "ema",
      "class_counts_fvd": {str(c): int(n) for c, n in zip(classes, counts)},
      "reference": {"dataset": config.data.name, "split": evaluation.reference_split,
                    "clips": f"{num_fvd} clips of the split: synthetic in order, real videos in a "
                             f"permutation seeded by config.seed",
                    "cache": str(cache_path)},
      "video": {"frames": int(config.data.num_frames), "resolution": int(config.data.resolution)},
      "protocol": protocol(config, int(config.data.num_frames)),
      "wall_time_s": round(time.perf_counter() - started, 1),
  })
  out_dir = epath.Path(out_dir) if out_dir else workdir_lib.new_output_dir(
      workdir_lib.eval_dir(workdir))
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  logging.info("Evaluation at stage-2 step %d: FVD %.2f, KVD %.4f, IS %s (written to %s).",
               results["checkpoint_step"], results["fvd"], results["kvd"],
               results["inception_score"], out_dir / "results.json")
  return results
