"""Shared measurement helpers for the benchmark scripts (PERFORMANCE.md's method).

Every timing is the median of several calls after a warm-up compile, with
``jax.block_until_ready`` on the outputs; beside it, achieved GFLOP/s from XLA's cost analysis
and the same run's float32 matmul rate, so each row also reads as a fraction of this machine.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from absl import app

from vqvdm_jax import runtime


def load_config(path: str, arg: str | None = None):
  """``get_config(arg)`` of a config file, as ``--config=path`` would load it."""
  spec = importlib.util.spec_from_file_location("benchmark_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def compiled_flops(fn: Callable, *args: Any) -> float:
  """FLOPs of one call as XLA counts them (0 when the backend does not report them)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def time_call(fn: Callable, *args: Any, repeats: int = 5) -> tuple[float, float]:
  """(median, stdev) seconds of ``fn(*args)`` after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times), (statistics.stdev(times) if len(times) > 1 else 0.0)


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
  """This run's float32 matmul rate: the reference each row is a fraction of."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  seconds, _ = time_call(matmul, a, repeats=repeats)
  return 2 * size ** 3 / seconds / 1e9


def peak_memory_gib() -> float | None:
  """Peak bytes in use on device 0 since start, where the backend reports it (GPU/TPU)."""
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2 ** 30


def device_description() -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  return (f"{len(jax.devices())} x {kind} ({device.platform}), jax {jax.__version__}, "
          f"{platform.processor() or platform.machine()}")


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
  print(f"\n### {title}\n")
  print("| " + " | ".join(header) + " |")
  print("| " + " | ".join("---" for _ in header) + " |")
  for row in rows:
    print("| " + " | ".join(row) + " |")


def make_ddpm_sampler(config, shape: tuple[int, ...], steps: int, guidance_scale: float):
  """``(jit(params, seed) -> one DDPM sample batch of shape, params)``: the config's U-Net,
  conditioned as the config says (class 0, 25 fps), ``steps`` strided DDPM steps; video ``i``
  from the key ``sampling.generate_batches`` gives it (:func:`row_random.video_keys`)."""
  from vqvdm_jax.diffusion import model as diffusion_model
  from vqvdm_jax import row_random
  from vqvdm_jax.diffusion import samplers

  unet = diffusion_model.make_unet(config)
  schedule = diffusion_model.make_schedule(config)
  apply_fn = diffusion_model.apply_unet(unet, config)
  batch = shape[0]
  labels = jnp.zeros((batch,), jnp.int32) if config.diffusion.use_class else None
  fps = jnp.full((batch,), 25.0) if config.diffusion.use_fps else None
  params = jax.jit(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                     jnp.zeros((batch,), jnp.int32), fps, labels)["params"])()

  @jax.jit
  def sample(params, seed):
    model_fn = samplers.make_guided_model_fn(apply_fn, params, fps, labels,
                                             diffusion_model.null_label(config), guidance_scale)
    return samplers.ddpm_sample(model_fn, schedule, shape, row_random.video_keys(seed, 0, batch),
                                num_steps=steps)

  return sample, params


def run_main(main: Callable[[list[str]], None]) -> None:
  """A benchmark script's entry: restarted with huge-page malloc, as ``python -m
  vqvdm_jax.main`` runs (:func:`vqvdm_jax.runtime.restart_with_huge_page_malloc`), then
  ``absl.app.run(main)``."""
  runtime.restart_with_huge_page_malloc()
  app.run(main)
