"""A frame-classifier probe: is the conditioned class recognisable in generated videos?

FVD says whether samples look like the data, not whether a class-conditional model drew the
class it was asked for; the paper's Inception Score needs a C3D fine-tuned on UCF-101. For data
without such a network (the embedded moving sprites) a small CNN is trained on frames and a clip
is labelled by its frames' mean logits. Trained on the tokenizer's reconstructions of training
clips, its held-out accuracy is the ceiling for samples decoded by that tokenizer, and the
accuracy on samples, per guidance scale, measures classifier-free guidance end to end
(``benchmarks/sample_classes.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vqvdm_jax.data import pipeline

PyTree = Any


class FrameClassifier(nn.Module):
  """Three stride-2 3x3 convs with ReLU, global average pooling, a linear head: frame -> logits."""

  num_classes: int
  features: tuple[int, ...] = (32, 64, 64)

  @nn.compact
  def __call__(self, frames: jax.Array) -> jax.Array:  # [N, H, W, 3] in [0, 1]
    h = frames
    for features in self.features:
      h = nn.relu(nn.Conv(features, (3, 3), strides=2)(h))
    return nn.Dense(self.num_classes)(h.mean(axis=(1, 2)))


def _frames(videos_uint8: np.ndarray) -> np.ndarray:
  return (np.asarray(videos_uint8, np.float32) / 255.0).reshape(-1, *videos_uint8.shape[2:])


def train_frame_classifier(videos_uint8: np.ndarray, labels: np.ndarray, num_classes: int,
                           num_steps: int = 600, batch_size: int = 128,
                           learning_rate: float = 2e-3, seed: int = 0) -> PyTree:
  """Adam on the cross-entropy of single frames; every frame carries its clip's label.

  ``videos_uint8 [N, T, H, W, 3]``, ``labels [N]`` in ``[0, num_classes)``. Returns the params.
  """
  labels = np.asarray(labels)
  if videos_uint8.ndim != 5 or len(videos_uint8) != len(labels):
    raise ValueError(f"Expected videos [N, T, H, W, 3] and labels [N], got {videos_uint8.shape} "
                     f"and {labels.shape}.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}.")
  frames = _frames(videos_uint8)
  frame_labels = np.repeat(labels, videos_uint8.shape[1]).astype(np.int32)
  model = FrameClassifier(num_classes)
  params = model.init(jax.random.PRNGKey(seed), frames[:1])["params"]
  tx = optax.adam(learning_rate)

  @jax.jit
  def step(params, opt_state, batch_frames, batch_labels):
    def loss_fn(params):
      logits = model.apply({"params": params}, batch_frames)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  for _ in range(num_steps):
    index = rng.integers(0, len(frames), min(batch_size, len(frames)))
    params, opt_state = step(params, opt_state, frames[index], frame_labels[index])
  return params


@functools.partial(jax.jit, static_argnums=0)
def _frame_logits(num_classes: int, params: PyTree, frames: jax.Array) -> jax.Array:
  # The weights are an argument, not a closure's constants: one compile per frame count serves
  # every probe and every call (the held-out ceiling, then each prior's samples).
  return FrameClassifier(num_classes).apply({"params": params}, frames)


def predict_clip_labels(params: PyTree, videos_uint8: np.ndarray, num_classes: int,
                        batch_size: int = 64) -> np.ndarray:
  """Each clip's class: the argmax of its frames' mean logits. ``[N]`` int."""
  predictions = []
  for start in range(0, len(videos_uint8), batch_size):
    clips = videos_uint8[start:start + batch_size]
    logits = np.asarray(_frame_logits(num_classes, params, jnp.asarray(_frames(clips))))
    predictions.append(logits.reshape(len(clips), -1, num_classes).mean(axis=1).argmax(axis=-1))
  return np.concatenate(predictions) if predictions else np.zeros((0,), np.int64)


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray,
                       num_classes: int) -> np.ndarray:
  """Accuracy within each class ``[num_classes]``; NaN where a class has no clip."""
  accuracy = np.full(num_classes, np.nan)
  for label in range(num_classes):
    mask = labels == label
    if mask.any():
      accuracy[label] = float((predicted[mask] == label).mean())
  return accuracy


def foreground_visible(videos_uint8: np.ndarray, contrast: float = 48.0) -> np.ndarray:
  """Whether each clip shows something brighter than its background: ``[N]`` bool.

  A frame counts when its brightest pixel (mean of RGB) exceeds the frame's median by
  ``contrast`` grey levels; a clip when at least half its frames do. On the moving sprites every
  sprite channel is brighter than every background pixel, so an empty-looking sample, which a
  classifier still has to give some label, is caught here.
  """
  luminance = np.asarray(videos_uint8, np.float32).mean(axis=-1)  # [N, T, H, W]
  flat = luminance.reshape(*luminance.shape[:2], -1)
  frame_visible = flat.max(axis=-1) - np.median(flat, axis=-1) > contrast
  return frame_visible.mean(axis=1) >= 0.5



def reconstruction_probe(tokenizer: Any, config: Any, num_clips: int, num_steps: int
                         ) -> tuple[PyTree, np.ndarray, np.ndarray]:
  """The probe trained on ``tokenizer``'s reconstructions of the first ``num_clips`` training
  clips of ``config.data``, an eighth held out: its accuracy on those is the ceiling for anything
  the tokenizer decodes.

  ``tokenizer``: an :class:`vqvdm_jax.inference.tokenizer.Tokenizer`. Returns (params, held-out
  reconstructions ``[num_clips // 8, T, H, W, 3]`` uint8, their labels).
  """
  clips, labels = [], []
  for batch in pipeline.ordered_batches(config.data, "train", 64, num_clips, config.seed):
    latents = tokenizer.encode_for_diffusion(batch["video"])
    clips.append(np.asarray(tokenizer.decode_latents(latents)))
    labels.append(np.asarray(batch["label"]))
  clips, labels = np.concatenate(clips), np.concatenate(labels)
  held_out = len(clips) // 8
  params = train_frame_classifier(clips[held_out:], labels[held_out:], config.data.num_classes,
                                  num_steps, seed=config.seed)
  return params, clips[:held_out], labels[:held_out]


def class_scores(params: PyTree, videos_uint8: np.ndarray, expected: np.ndarray,
                 num_classes: int) -> dict[str, Any]:
  """How well clips show their conditioned class: probe accuracy, the share both correctly
  labelled and with a visible sprite, the share visible, and both per class (``[num_classes]``)."""
  predicted = predict_clip_labels(params, videos_uint8, num_classes)
  correct, visible = predicted == expected, foreground_visible(videos_uint8)
  return {"accuracy": float(correct.mean()),
          "correct_and_visible": float((correct & visible).mean()),
          "visible": float(visible.mean()),
          "per_class_accuracy": per_class_accuracy(predicted, expected, num_classes),
          "per_class_visible": np.array([visible[expected == label].mean()
                                         if (expected == label).any() else np.nan
                                         for label in range(num_classes)])}
