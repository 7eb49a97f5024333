"""A workdir's layout and its record of the config it was trained with.

The first run on a workdir writes ``DIR/config.json``, the whole resolved config. Everything
that later reads the workdir (sampling, evaluation, :func:`vqvdm_jax.load`, a resumed run)
starts from that record, and a run whose model-defining fields differ from it stops before
anything is restored or written, naming each differing field.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import ml_collections
from etils import epath

from vqvdm_jax import config as config_lib
from vqvdm_jax import fileio

CONFIG_FILE = "config.json"

# Fields that decide the shape or meaning of saved weights: a checkpoint cannot be used under
# other values. Prefixes cover a whole group.
MODEL_FIELDS = (
    "data.name", "data.num_frames", "data.resolution", "data.num_classes",
    "vqgan.model.", "vqgan.quantizer.", "vqgan.discriminator.",
    "diffusion.unet.", "diffusion.schedule.", "diffusion.use_class", "diffusion.use_fps",
    "diffusion.prediction", "diffusion.latents.source", "diffusion.latents.center",
    "transformer.model.",
)
# Inside those groups, how the model computes, not what it is: free to change on a trained model
# (e.g. bfloat16 and cuDNN attention on a GPU for a model trained in float32 on a CPU).
COMPUTE_FIELDS = ("dtype", "remat", "conv_impl", "attention_impl")


def vqgan_dir(workdir: fileio.PathLike) -> epath.Path:
  """``DIR/vqgan``; an epath, so that ``--workdir=gs://bucket/run`` keeps its scheme."""
  return epath.Path(workdir) / "vqgan"


def diffusion_dir(workdir: fileio.PathLike) -> epath.Path:
  """``DIR/diffusion``."""
  return epath.Path(workdir) / "diffusion"


def stage2_dir(workdir: fileio.PathLike, stage2: str) -> epath.Path:
  """``DIR/<stage2>``: ``DIR/diffusion``, ``DIR/autoregressive`` or ``DIR/masked`` (config.stage2)."""
  return epath.Path(workdir) / stage2


def tokens_dir(workdir: fileio.PathLike) -> epath.Path:
  """``DIR/tokens``: the code indices of the train split, one cache for both token priors."""
  return epath.Path(workdir) / "tokens"


def samples_dir(workdir: fileio.PathLike) -> epath.Path:
  """``DIR/samples``: one numbered folder per ``--mode=sample`` (and ``train``) invocation."""
  return epath.Path(workdir) / "samples"


def eval_dir(workdir: fileio.PathLike) -> epath.Path:
  """``DIR/eval``: one numbered folder per ``--mode=evaluate`` invocation."""
  return epath.Path(workdir) / "eval"


def vqgan_eval_dir(workdir: fileio.PathLike) -> epath.Path:
  """``DIR/vqgan/eval``: one numbered folder per ``--mode=evaluate_vqgan`` invocation."""
  return vqgan_dir(workdir) / "eval"


def new_output_dir(parent: fileio.PathLike) -> epath.Path:
  """``parent/NNN``, the next number after every existing one: an invocation's outputs never
  land beside (or over) an earlier invocation's."""
  parent = epath.Path(parent)
  taken = [int(p.name) for p in parent.iterdir() if p.name.isdigit()] if parent.exists() else []
  return parent / f"{max(taken, default=-1) + 1:03d}"


def require_checkpoints(workdir: fileio.PathLike, stage: str) -> None:
  """Fails with what to run when ``stage`` ('vqgan' or a config.stage2 prior) has no checkpoint
  yet."""
  from vqvdm_jax import checkpointing  # Orbax: only for the modes that read checkpoints
  directory = epath.Path(workdir) / stage / "checkpoints"
  if not checkpointing.checkpoint_steps(directory):
    step_mode = {"vqgan": "train_vqgan", "diffusion": "train_diffusion"}.get(
        stage, f"train_prior --config.stage2={stage}")
    what = "stage-1 (tokenizer)" if stage == "vqgan" else f"stage-2 ({stage})"
    raise config_lib.MissingCheckpointError(
        f"{epath.Path(workdir)} has no {what} checkpoint (in {directory}); train it first: "
        f"python -m vqvdm_jax.main --workdir={workdir} --mode={step_mode} (with --config for a "
        f"new workdir).")


def check_writable(directory: fileio.PathLike) -> None:
  """Fails at start-up, before any compilation, when outputs could not be written there."""
  directory = epath.Path(directory)
  for parent in (directory, *directory.parents):
    if parent.exists():
      if not parent.is_dir():
        raise config_lib.ConfigError(f"{parent} is a file, not a directory: choose another "
                                     f"--workdir (or --output_dir).")
      break
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_test_{uuid.uuid4().hex}"
    probe.write_text("")
    probe.unlink()
  except OSError as error:
    raise config_lib.ConfigError(f"Cannot write to {directory} ({error.strerror or error}): "
                                 f"choose a writable --workdir (or --output_dir).") from error


def config_path(workdir: fileio.PathLike) -> epath.Path:
  return epath.Path(workdir) / CONFIG_FILE


def _plain(value: Any) -> Any:
  """JSON values compare like config values: lists as tuples, recursively."""
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def flatten(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """``{'vqgan.model.channels': 64, ...}``: every leaf field by its dotted name."""
  items = (config.items() if isinstance(config, dict)
           else config.items(preserve_field_references=False))
  flat = {}
  for key, value in items:
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      flat.update({f"{key}.{k}": v for k, v in flatten(value).items()})
    else:
      flat[key] = _plain(value)
  return flat


def is_model_field(name: str) -> bool:
  if name.rpartition(".")[2] in COMPUTE_FIELDS:
    return False
  return any(name == prefix or (prefix.endswith(".") and name.startswith(prefix))
             for prefix in MODEL_FIELDS)


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(json.loads(config.to_json_best_effort()), indent=2, sort_keys=True) + "\n"


def config_from_json(text: str) -> ml_collections.ConfigDict:
  """The config a record describes: the defaults of :func:`config.base_config` with every
  recorded value set, so shared fields stay shared (``FieldReference``s) and tuples stay tuples.
  """
  config = config_lib.base_config()
  for name, value in flatten(json.loads(text)).items():
    *groups, field = name.split(".")
    target = config
    for group in groups:
      if group not in target:
        raise config_lib.ConfigError(f"The recorded config has a field config.{name} that this "
                                     f"version of vqvdm_jax does not know.")
      target = target[group]
    if field not in target:
      raise config_lib.ConfigError(f"The recorded config has a field config.{name} that this "
                                   f"version of vqvdm_jax does not know.")
    target[field] = value
  return config


def read_config(workdir: fileio.PathLike) -> ml_collections.ConfigDict | None:
  """The config recorded in ``workdir``, or None when it has no record."""
  path = config_path(workdir)
  if not path.exists():
    return None
  return config_from_json(path.read_text())


def model_differences(stored: ml_collections.ConfigDict,
                      given: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """``(field, stored value, given value)`` for each model-defining field that differs."""
  stored_flat, given_flat = flatten(stored), flatten(given)
  names = sorted(name for name in set(stored_flat) | set(given_flat) if is_model_field(name))
  return [(name, stored_flat.get(name), given_flat.get(name)) for name in names
          if stored_flat.get(name) != given_flat.get(name)]


def check_or_record_config(config: ml_collections.ConfigDict, workdir: fileio.PathLike,
                           write: bool = True) -> None:
  """Compares ``config`` with the workdir's record; records it when there is none (``write``).

  Raises :class:`config.ConfigError` listing every model-defining field that differs, before
  anything in the workdir is read or written.
  """
  stored = read_config(workdir)
  if stored is not None:
    differences = model_differences(stored, config)
    if differences:
      lines = "\n".join(f"  config.{name}: trained with {old!r}, given {new!r}"
                        for name, old, new in differences)
      raise config_lib.ConfigError(
          f"{epath.Path(workdir)} holds a model trained with another config:\n{lines}\n"
          f"Drop those overrides (or --config) to use the recorded config "
          f"{config_path(workdir)}, or train in a new --workdir.")
    return
  if write:
    path = config_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_json(config))
