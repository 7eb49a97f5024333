"""Files of a workdir that may be local or on Cloud Storage (``--workdir=gs://bucket/run``).

Every path derived from the workdir is an ``etils.epath.Path``: ``pathlib.Path('gs://b/run')``
collapses the scheme into ``gs:/b/run``, a local relative folder, while epath keeps the URI and
reaches the bucket through TensorFlow's gfile (installed for clu's summaries). Orbax, grain and
clu take such paths as they are. Libraries that only write to or read from local files (PyAV,
imageio, ``np.load``'s memory map) get bytes in memory instead; see ``video_io`` and the array
helpers below. Local paths behave exactly as with ``pathlib``.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for URIs (``gs://``, ``s3://``...), False for paths on a local filesystem."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
  """``path`` made absolute; URIs are already, and ``epath.Path.absolute`` would mangle them."""
  path = epath.Path(path)
  return path if is_remote(path) else path.absolute()


def save_npy(path: PathLike, array: np.ndarray) -> None:
  """``np.save`` to a local or remote ``.npy`` file (written as a stream, no local copy)."""
  with epath.Path(path).open("wb") as file:
    np.save(file, array)


def save_npz(path: PathLike, **arrays: np.ndarray) -> None:
  """``np.savez`` to a local or remote file; zip needs seeking, so it is built in memory."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  epath.Path(path).write_bytes(buffer.getvalue())


def load_numpy(path: PathLike, mmap_mode: str | None = None) -> Any:
  """``np.load`` of a local or remote ``.npy``/``.npz`` file.

  Local files are memory-mapped when ``mmap_mode`` asks for it; a remote file cannot be, so it
  is read into memory whole.
  """
  if not is_remote(path):
    return np.load(os.fspath(path), mmap_mode=mmap_mode)
  return np.load(io.BytesIO(epath.Path(path).read_bytes()))
