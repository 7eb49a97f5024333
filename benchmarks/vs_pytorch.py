r"""Our tokenizer and U-Net against the same models written plainly in PyTorch, same cores, one run.

Passes: tokenizer encode, decode, forward+backward (reconstruction + quantizer loss), U-Net
forward and train step (MSE + Adam). Shapes: ``demo`` (configs/demo.py's models, 8x32x32 clips,
batch 4; its U-Net at the demo's own train batch of 16 latents) and ``paper`` (16x64x64, batch 1,
a tokenizer of channels 64, multipliers (1, 2, 4, 4), one residual block a level, no attention;
configs/ucf101.py's U-Net on the 4x8x8x4 latent). Each pass's FLOPs are XLA's count for our
program (``cost_analysis``), used for both frameworks. Our upsampling convs run as phase convs
(``layers.upsampled_conv``) with fewer FLOPs than PyTorch's conv of the repeated input, so on the
decoder this count is lower than PyTorch's (paper decode: 115 against 172 GFLOP) and PyTorch's
GFLOP/s are understated by as much; the time ratio is the comparison. Our conv forms and
PyTorch's repetitions are interleaved (the machine's speed drifts) and the medians reported,
beside this run's float32 2048² matmul rate. PyTorch is the ``bench`` extra: ``pip install -e '.[bench]'``.

  python benchmarks/vs_pytorch.py                               # both shapes, ~15 min on 2 cores
  python benchmarks/vs_pytorch.py --shapes=paper --models=tokenizer --sweep   # XLA:CPU options
  python benchmarks/vs_pytorch.py --layers --shapes=paper     # each conv layer alone, ~3 min

``--sweep`` times only our tokenizer at the paper shape, once per XLA:CPU option / conv form,
each in a fresh subprocess (XLA_FLAGS is read at start-up), and checks the outputs agree.
``--layers`` times every distinct convolution of the tokenizer alone (its input shape, taken
from the model), forward and forward+backward (input and kernel gradients), against PyTorch's
replicate-padded ``Conv3d`` of the same shape, beside the layer's share of the model's conv FLOPs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import common

from vqvdm_jax import runtime
from vqvdm_jax.diffusion import model as diffusion_model
from vqvdm_jax.models import layers as layers_lib
from vqvdm_jax.models.vqgan import VQGAN3D, latent_shape, make_vqgan

flags.DEFINE_list("shapes", ["demo", "paper"], "Shapes to measure: demo, paper.")
flags.DEFINE_list("models", ["tokenizer", "unet"], "Models to measure.")
flags.DEFINE_list("conv_impls", ["auto", "taps"],
                  "Our 3D conv forms to time ('auto': the configs' default, chosen per layer).")
flags.DEFINE_list("passes", [], "Only these passes (default: all).")
flags.DEFINE_integer("repeats", 5, "Interleaved timed calls per pass (median reported).")
flags.DEFINE_bool("torch", True, "Time the PyTorch peer (needs the bench extra).")
flags.DEFINE_bool("sweep", False, "Time XLA:CPU options on our tokenizer, one subprocess each.")
flags.DEFINE_bool("layers", False, "Time each distinct conv layer of the tokenizer alone, ours "
                  "against PyTorch's Conv3d: which layers lose, and their share of the FLOPs.")
flags.DEFINE_list("variants", [], "Sweep variants to run (default: all of SWEEP).")
flags.DEFINE_string("json", "", "Write rows (and encode output) here: the sweep's child mode.")
FLAGS = flags.FLAGS

XNN_MODE = "--xla_cpu_experimental_xnn_graph_fusion_mode="
# name -> (XLA_FLAGS, conv_impl). Baselines first; every other row is compared with its form's.
SWEEP = {
    "native": ("", "native"),
    "taps": ("", "taps"),
    "native onednn": ("--xla_cpu_use_onednn=true", "native"),
    "taps onednn": ("--xla_cpu_use_onednn=true", "taps"),
    "native xnn GREEDY": (XNN_MODE + "XNN_GRAPH_FUSION_MODE_GREEDY", "native"),
    "native xnn GREEDY_SLINKY": (XNN_MODE + "XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY", "native"),
    "native xnn BYPASS_COST_MODEL": (XNN_MODE + "XNN_GRAPH_FUSION_MODE_BYPASS_COST_MODEL",
                                     "native"),
    "taps xnn GREEDY": (XNN_MODE + "XNN_GRAPH_FUSION_MODE_GREEDY", "taps"),
    "native no xnnpack": ("--xla_cpu_use_xnnpack=false", "native"),
    "native again": ("", "native"),  # last: how far the machine drifted over the sweep
}


def shape_config(shape: str):
  """(config, tokenizer batch, U-Net batch) of a named shape."""
  root = Path(__file__).resolve().parents[1]
  if shape == "demo":
    config = common.load_config(str(root / "configs/demo.py"))
    return config, 4, config.diffusion.train.batch_size
  config = common.load_config(str(root / "configs/ucf101.py"))
  config.data.num_frames, config.data.resolution = 16, 64
  model = config.vqgan.model
  model.channels, model.channel_multipliers, model.num_res_blocks = 64, (1, 2, 4, 4), 1
  model.attention_at_lowest = False
  return config, 1, 1


def count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------- our passes


def our_tokenizer(config, batch: int, conv_impls: list[str]):
  """{pass: (flops, {impl: (fn, args)})}, the parameter count and the encode output."""
  data = config.data
  video = jax.random.uniform(jax.random.PRNGKey(1),
                             (batch, data.num_frames, data.resolution, data.resolution, 3),
                             jnp.float32, -1.0, 1.0)
  passes: dict = {"encode": [None, {}], "decode": [None, {}], "forward+backward": [None, {}]}
  variables, params_count, encoded = None, 0, None
  for impl in conv_impls:
    config.vqgan.model.conv_impl = impl
    model = make_vqgan(config)
    if variables is None:  # one parameter tree serves every conv form
      variables = jax.jit(model.init)(jax.random.PRNGKey(0), video)
      params_count = count(variables["params"])
    encode = jax.jit(lambda v, x, m=model: m.apply(v, x, method=VQGAN3D.encode))
    latent = encode(variables, video)
    if encoded is None:
      encoded = np.asarray(latent)
    decode = jax.jit(lambda v, z, m=model: m.apply(v, z, method=VQGAN3D.decode))

    def loss(params, rest, x, m=model):
      x_hat, quantized = m.apply({"params": params, **rest}, x)
      return jnp.mean((x_hat - x) ** 2) + quantized.loss

    rest = {k: v for k, v in variables.items() if k != "params"}
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    for name, fn, args in (("encode", encode, (variables, video)),
                           ("decode", decode, (variables, latent)),
                           ("forward+backward", fwd_bwd, (variables["params"], rest, video))):
      if FLAGS.passes and name not in FLAGS.passes:
        continue
      if passes[name][0] is None:
        passes[name][0] = common.compiled_flops(fn, *args)
      passes[name][1][impl] = (fn, args)
  return passes, params_count, encoded


def our_unet(config, batch: int, conv_impls: list[str]):
  shape = (batch, *latent_shape(config)[1:])
  z = jax.random.normal(jax.random.PRNGKey(1), shape)
  t = jnp.arange(batch, dtype=jnp.int32) * 7 % 1000
  fps = jnp.full((batch,), 8.0)
  labels = jnp.zeros((batch,), jnp.int32)
  passes: dict = {"U-Net forward": [None, {}], "U-Net train step": [None, {}]}
  params, params_count = None, 0
  optimizer = optax.adam(1e-4)
  for impl in conv_impls:
    config.diffusion.unet.conv_impl = impl
    unet = diffusion_model.make_unet(config)
    apply_fn = diffusion_model.apply_unet(unet, config)
    if params is None:
      params = jax.jit(unet.init)(jax.random.PRNGKey(0), z, t, fps, labels)["params"]
      params_count = count(params)
      opt_state = optimizer.init(params)
    forward = jax.jit(lambda p, *a, f=apply_fn: f(p, *a))

    def train_step(params, opt_state, z, t, fps, labels, f=apply_fn):
      loss, grads = jax.value_and_grad(
          lambda p: jnp.mean((f(p, z, t, fps, labels) - z) ** 2))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(train_step)
    for name, fn, args in (("U-Net forward", forward, (params, z, t, fps, labels)),
                           ("U-Net train step", step, (params, opt_state, z, t, fps, labels))):
      if passes[name][0] is None:
        passes[name][0] = common.compiled_flops(fn, *args)
      passes[name][1][impl] = (fn, args)
  return passes, params_count


# ---------------------------------------------------------------- the PyTorch peer


def torch_tokenizer(config, batch: int):
  import torch
  import torch_models
  data = config.data
  model = torch_models.VQGAN(config.vqgan.model, config.vqgan.quantizer)
  video = torch.rand(batch, 3, data.num_frames, data.resolution, data.resolution) * 2 - 1
  with torch.no_grad():
    latent = model.encoder(video)

  def encode():
    with torch.no_grad():
      return model.encoder(video)

  def decode():
    with torch.no_grad():
      return model.decoder(latent)

  def forward_backward():
    model.zero_grad(set_to_none=True)
    x_hat, quantizer_loss = model(video)
    loss = torch.mean((x_hat - video) ** 2) + quantizer_loss
    loss.backward()
    return loss

  params = sum(p.numel() for p in model.parameters())
  return {"encode": encode, "decode": decode, "forward+backward": forward_backward}, params


def torch_unet(config, batch: int):
  import torch
  import torch_models
  shape = latent_shape(config)
  model = torch_models.UNet(config, shape[-1])
  z = torch.randn(batch, shape[-1], *shape[1:4])
  t = torch.arange(batch) * 7 % 1000
  fps = torch.full((batch,), 8.0)
  labels = torch.zeros(batch, dtype=torch.long)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

  def forward():
    with torch.no_grad():
      return model(z, t, fps, labels)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.mean((model(z, t, fps, labels) - z) ** 2)
    loss.backward()
    optimizer.step()
    return loss

  params = sum(p.numel() for p in model.parameters())
  return {"U-Net forward": forward, "U-Net train step": train_step}, params


# ---------------------------------------------------------------- one conv layer at a time


def tokenizer_convs(config, batch: int) -> dict[tuple, int]:
  """{(input shape, C_out, kernel, strides, upsample): how many times the tokenizer's encoder
  and decoder run it}, read from the model's own calls (flax's method interceptor)."""
  data = config.data
  video = jnp.zeros((batch, data.num_frames, data.resolution, data.resolution, 3))
  found: dict[tuple, int] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, layers_lib.Conv3D) and context.method_name == "__call__":
      if module.causal:
        raise app.UsageError("--layers times non-causal convs only (PyTorch's peer has none).")
      key = (tuple(args[0].shape), module.features, tuple(module.kernel_size),
             tuple(module.strides), tuple(module.upsample))
      found[key] = found.get(key, 0) + 1
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(record):
    jax.eval_shape(make_vqgan(config).init, jax.random.PRNGKey(0), video)
  return found


def upsampled_shape(key: tuple) -> tuple[int, ...]:
  """The input shape of one conv (``tokenizer_convs``' key) as PyTorch's peer sees it: repeated
  x2 on the axes an upsampling conv upsamples (ours convolves the input itself)."""
  shape, upsample = key[0], key[4]
  return (shape[0], *(size * (2 if up else 1) for size, up in zip(shape[1:4], upsample)),
          shape[-1])


def conv_positions(key: tuple) -> int:
  """Output positions of one conv (``tokenizer_convs``' key), after its replicate padding."""
  shape, _, kernel, strides, _ = key
  padded = [size + sum(pad) for size, pad in
            zip(upsampled_shape(key)[1:4], layers_lib.conv_padding(kernel, strides, False))]
  return shape[0] * int(np.prod([(size - k) // s + 1
                                 for size, k, s in zip(padded, kernel, strides)]))


def layer_flops(key: tuple) -> float:
  """Forward FLOPs of one conv: 2 x output positions x taps x C_in x C_out (of an upsampling
  conv, those of the conv over the repeated input, which ours does in (3/2)^d fewer)."""
  shape, features, kernel, _, _ = key
  return 2.0 * conv_positions(key) * int(np.prod(kernel)) * shape[-1] * features


def time_one_conv(key: tuple) -> dict[str, float]:
  """Median seconds of one conv (``tokenizer_convs``' key), ours ('auto') and PyTorch's,
  forward ('ours', 'pytorch') and forward+backward ('... grad'), interleaved. An upsampling conv:
  ours on the input itself, PyTorch's Conv3d on the input already repeated (its repeat untimed)."""
  import torch
  import torch_models
  shape_in, features, kernel, strides, upsample = key
  conv = layers_lib.Conv3D(features, kernel, strides, upsample=upsample)
  x = jax.random.normal(jax.random.PRNGKey(0), shape_in)
  params = jax.jit(conv.init)(jax.random.PRNGKey(1), x)
  forward = jax.jit(conv.apply)
  gradients = jax.jit(jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) ** 2), argnums=(0, 1)))
  peer = torch_models.Conv3d(shape_in[-1], features, kernel, strides)
  peer_shape = upsampled_shape(key)
  x_torch = torch.randn(peer_shape[0], peer_shape[-1], *peer_shape[1:4], requires_grad=True)

  def peer_forward():
    with torch.no_grad():
      return peer(x_torch)

  def peer_gradients():
    peer.zero_grad(set_to_none=True)
    x_torch.grad = None
    loss = torch.sum(peer(x_torch) ** 2)
    loss.backward()
    return loss

  return interleaved({"ours": lambda: forward(params, x), "pytorch": peer_forward,
                      "ours grad": lambda: gradients(params, x),
                      "pytorch grad": peer_gradients}, FLAGS.repeats)


def measure_layers(shape: str, matmul: float) -> list[list[str]]:
  """One row per distinct conv of the tokenizer, the largest share of its conv FLOPs first:
  ours ('auto', the form it picks for the layer) against PyTorch's, in GFLOP/s."""
  config, batch, _ = shape_config(shape)
  convs = tokenizer_convs(config, batch)
  total = sum(layer_flops(key) * uses for key, uses in convs.items())
  rows = []
  for key, uses in sorted(convs.items(), key=lambda item: -layer_flops(item[0]) * item[1]):
    shape_in, features, kernel, strides, upsample = key
    seconds = time_one_conv(key)
    flops = layer_flops(key)
    rate = {name: (flops * (3 if "grad" in name else 1)) / value / 1e9
            for name, value in seconds.items()}
    positions = conv_positions(key)
    if layers_lib.phases_save_flops(shape_in, upsample):
      form = "phases, " + layers_lib.resolve_upsampling_conv_impl("auto", shape_in, upsample)
    else:  # a plain conv, or one over the repeated input
      form = layers_lib.resolve_conv_impl("auto", shape_in[-1],
                                          positions * int(np.prod(kernel)) * shape_in[-1],
                                          features, positions)
    rows.append(["x".join(map(str, shape_in)), str(features),
                 "x".join(map(str, kernel)) + ("" if set(strides) == {1} else
                                              " /" + "x".join(map(str, strides)))
                 + ("" if not any(upsample) else
                    " x2 " + "".join(a for a, up in zip("THW", upsample) if up)),
                 f"{uses}", f"{100 * flops * uses / total:.0f} %", form,
                 f"{rate['ours']:.0f}", f"{rate['pytorch']:.0f}",
                 f"{seconds['pytorch'] / seconds['ours']:.2f}",
                 f"{rate['ours grad']:.0f}", f"{rate['pytorch grad']:.0f}",
                 f"{seconds['pytorch grad'] / seconds['ours grad']:.2f}"])
    print(rows[-1], flush=True)
  common.print_table(
      f"Each conv of the {shape} tokenizer alone, GFLOP/s (forward+backward counts 3x the "
      f"forward's FLOPs; ratio = PyTorch time / ours; matmul {matmul:.0f} GFLOP/s)",
      ["input", "C_out", "kernel", "uses", "share of conv FLOPs", "our form", "ours fwd",
       "PyTorch fwd", "fwd ratio", "ours fwd+bwd", "PyTorch fwd+bwd", "fwd+bwd ratio"], rows)
  return rows


# ---------------------------------------------------------------- timing


def interleaved(candidates: dict, repeats: int) -> dict:
  """{name: median seconds}: rounds calling every candidate in turn (against the machine's
  drift), each timed call right after an untimed one of the same candidate, as in a training
  loop. Timed straight after another framework's call, a call ran up to 1.5x slower (PyTorch's
  OpenMP threads keep spinning after a parallel region; after an idle pause its first call ran
  3x slower instead): on the demo tokenizer, the first of two identical forms of ours measured
  11-13 ms against the second's 7-9 ms."""
  times = {name: [] for name in candidates}
  for _ in range(repeats):
    for name, fn in candidates.items():
      jax.block_until_ready(fn())
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def measure_shape(shape: str, matmul: float) -> list[dict]:
  config, tokenizer_batch, unet_batch = shape_config(shape)
  clip = f"{config.data.num_frames}x{config.data.resolution}x{config.data.resolution}"
  rows = []
  for model_name in FLAGS.models:
    if model_name == "tokenizer":
      ours, our_params, encoded = our_tokenizer(config, tokenizer_batch, FLAGS.conv_impls)
      batch, size = tokenizer_batch, clip
      if FLAGS.json:
        np.save(FLAGS.json + ".encode.npy", encoded)
      peer, peer_params = (torch_tokenizer(config, batch) if FLAGS.torch else ({}, None))
    else:
      ours, our_params = our_unet(config, unet_batch, FLAGS.conv_impls)
      batch, size = unet_batch, "x".join(map(str, latent_shape(config)[1:])) + " latent"
      peer, peer_params = (torch_unet(config, batch) if FLAGS.torch else ({}, None))
    if peer_params is not None and peer_params != our_params:
      print(f"WARNING: {model_name} parameters: ours {our_params:,}, PyTorch {peer_params:,}")
    for pass_name, (flops, impls) in ours.items():
      if FLAGS.passes and pass_name not in FLAGS.passes:
        continue
      candidates = {impl: (lambda fn=fn, args=args: fn(*args)) for impl, (fn, args) in
                    impls.items()}
      if pass_name in peer:
        candidates["pytorch"] = peer[pass_name]
      seconds = interleaved(candidates, FLAGS.repeats)
      rows.append({"pass": pass_name, "shape": size, "batch": batch, "gflop": flops / 1e9,
                   "params": our_params, "peer_params": peer_params, "seconds": seconds,
                   "matmul": matmul})
      print(json.dumps(rows[-1]), flush=True)
  return rows


def print_rows(rows: list[dict]) -> None:
  impls = FLAGS.conv_impls
  header = ["pass", "shape", "batch", "GFLOP"]
  header += [f"ours {impl}: ms (GFLOP/s)" for impl in impls]
  if FLAGS.torch:
    header += ["PyTorch: ms (GFLOP/s)"] + [f"ours {impl} / PyTorch" for impl in impls]
  table = []
  for row in rows:
    cells = [row["pass"], row["shape"], str(row["batch"]), f"{row['gflop']:.1f}"]
    names = impls + (["pytorch"] if FLAGS.torch else [])
    for name in names:
      seconds = row["seconds"][name]
      cells.append(f"{seconds * 1e3:.0f} ({row['gflop'] / seconds:.0f})")
    if FLAGS.torch:
      cells += [f"{row['seconds']['pytorch'] / row['seconds'][impl]:.2f}" for impl in impls]
    table.append(cells)
  common.print_table("Ours vs PyTorch (ratio = PyTorch time / our time: > 1 means ours is faster)",
                     header, table)


def sweep() -> None:
  """Each XLA:CPU variant in a fresh process; rows against the same conv form's baseline."""
  names = FLAGS.variants or list(SWEEP)
  results = {}
  with tempfile.TemporaryDirectory() as scratch:
    for name in names:
      xla_flags, impl = SWEEP[name]
      out = os.path.join(scratch, name.replace(" ", "_"))
      env = dict(os.environ)
      env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), xla_flags]))
      if not env["XLA_FLAGS"]:
        del env["XLA_FLAGS"]  # XLA reads an empty or blank value as a file name
      command = [sys.executable, __file__, "--shapes=paper", "--models=tokenizer", "--notorch",
                 f"--conv_impls={impl}", f"--repeats={FLAGS.repeats}", f"--json={out}",
                 f"--passes={','.join(FLAGS.passes)}"]
      start = time.perf_counter()
      done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
      if done.returncode:
        print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
        continue
      with open(out) as f:
        rows = json.load(f)
      results[name] = (impl, rows, np.load(out + ".encode.npy"))
      print(f"{name}: {time.perf_counter() - start:.0f} s, " + ", ".join(
          f"{r['pass']} {r['seconds'][impl] * 1e3:.0f} ms" for r in rows), flush=True)
  table = []
  for name, (impl, rows, encoded) in results.items():
    base = results.get(impl)
    cells = [name, f"{rows[0]['matmul']:.0f}"]
    for row, base_row in zip(rows, base[1] if base else [None] * len(rows)):
      seconds = row["seconds"][impl]
      speedup = "" if base_row is None else f", x{base_row['seconds'][impl] / seconds:.2f}"
      cells.append(f"{seconds * 1e3:.0f} ({row['gflop'] / seconds:.0f}{speedup})")
    reference = results.get("native", results.get(impl))[2]
    cells.append(f"{float(np.max(np.abs(encoded - reference))):.1e}")
    table.append(cells)
  common.print_table(
      "Our tokenizer at 16x64x64, batch 1, per XLA:CPU option (ms (GFLOP/s, x speed-up over "
      "the same conv form with default flags)); max |encode - native encode|",
      ["variant", "matmul GFLOP/s", *(r["pass"] for r in next(iter(results.values()))[1]),
       "max |d encode|"] if results else [],
      table)


def main(argv):
  del argv
  runtime.configure_jax()
  print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
  if FLAGS.sweep:
    sweep()
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    return
  cores = len(os.sched_getaffinity(0))
  if FLAGS.torch:
    import torch
    torch.set_num_threads(cores)
    torch.manual_seed(0)
  matmul = common.matmul_gflops()
  if FLAGS.layers:
    if not FLAGS.torch:
      raise app.UsageError("--layers compares each conv with PyTorch's: drop --notorch.")
    for shape in FLAGS.shapes:
      measure_layers(shape, matmul)
    print(f"Device: {common.device_description()}, {cores} threads; matmul "
          f"{common.matmul_gflops():.0f} GFLOP/s after; {FLAGS.repeats} repetitions, medians")
    return
  rows = []
  for shape in FLAGS.shapes:
    rows += measure_shape(shape, matmul)
  matmul_after = common.matmul_gflops()
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(rows, f)
    return
  torch_version = f", torch {__import__('torch').__version__}" if FLAGS.torch else ""
  print(f"Device: {common.device_description()}{torch_version}, {cores} threads; float32 2048² "
        f"matmul {matmul:.0f} GFLOP/s before, {matmul_after:.0f} after; {FLAGS.repeats} "
        f"interleaved repetitions, medians; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
  print_rows(rows)
  print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)


if __name__ == "__main__":
  common.run_main(main)
