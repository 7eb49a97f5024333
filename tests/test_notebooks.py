"""The Colab notebooks, executed headless (nbclient) so they cannot rot.

The demo notebook trains the tiny config for two steps per stage into a fresh workdir and
samples; the checkpoint notebook then restores that workdir and samples from it. Each notebook's
``parameters`` cell is followed by an injected cell with the test's values (papermill's
convention, without papermill). The kernel is a fresh process: it gets the tests' CPU devices and
their compilation cache.
"""

import json
import os
from pathlib import Path

import jax
import nbformat
import pytest
from helpers import load_config
from xla_flags import compilation_cache_environment
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "colab"
# The tiny config's own sampling settings: the compiled sampler is then the one the other tests
# compile, and comes from the shared compilation cache.
_SAMPLE = load_config("tiny").diffusion.sample
COMMON = {"REPO_DIR": str(REPO), "CONFIG": "configs/tiny.py", "NUM_VIDEOS": 4,
          "SAMPLER": _SAMPLE.sampler, "SAMPLE_STEPS": _SAMPLE.num_steps,
          "GUIDANCE_SCALE": _SAMPLE.guidance_scale}
STEPS = 2  # training steps per stage


def kernel_environment() -> dict[str, str]:
  """The kernel sees this checkout, CPU devices like the tests', and the shared compile cache."""
  python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
  return {**os.environ, "PYTHONPATH": python_path, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "JAX_NUM_CPU_DEVICES": str(jax.device_count()),
          **compilation_cache_environment()}


def execute(name: str, parameters: dict, cwd: Path) -> nbformat.NotebookNode:
  """Runs ``colab/NAME`` with ``parameters`` injected after its ``parameters`` cell."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  index = next(i for i, cell in enumerate(notebook.cells)
               if "parameters" in cell.metadata.get("tags", []))
  declared = notebook.cells[index].source
  for key in parameters:
    assert f"\n{key} = " in f"\n{declared}", f"{name} has no parameter {key}"
  overrides = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      overrides, metadata={"tags": ["injected-parameters"]}))
  client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}})
  client.execute(env=kernel_environment())
  return notebook


def outputs(notebook: nbformat.NotebookNode) -> tuple[str, list[dict]]:
  """All printed text of the notebook, and all of its rich (display) outputs."""
  text, displays = [], []
  for cell in notebook.cells:
    for output in cell.get("outputs", []):
      if output.output_type == "stream":
        text.append(output.text)
      elif output.output_type in ("display_data", "execute_result"):
        displays.append(output.data)
  return "".join(text), displays


def count_videos(displays: list[dict]) -> tuple[int, int]:
  """(inline GIF images, embedded MP4 videos) among the displays."""
  gifs = sum("image/gif" in data for data in displays)
  mp4s = sum('type="video/mp4"' in data.get("text/html", "") for data in displays)
  return gifs, mp4s


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[nbformat.NotebookNode, Path]:
  """The demo notebook, run on the tiny config: the workdir it trained, and its outputs.

  Twice the steps, but a time budget already spent: each stage stops at its first progress
  line, step STEPS, as the notebook's budget makes it on a slow CPU."""
  workdir = tmp_path_factory.mktemp("notebooks") / "workdir"
  notebook = execute("demo.ipynb", {**COMMON, "WORKDIR": str(workdir), "VQGAN_STEPS": 2 * STEPS,
                                    "DIFFUSION_STEPS": 2 * STEPS, "TIME_BUDGET_MINUTES": 1e-6},
                     workdir.parent)
  return notebook, workdir


def test_demo_notebook_trains_both_stages_and_shows_samples(demo_run):
  notebook, workdir = demo_run
  text, displays = outputs(notebook)
  assert f"Tokenizer trained to step {STEPS}." in text
  assert f"Diffusion model trained to step {STEPS}." in text
  assert (workdir / "vqgan" / "checkpoints" / str(STEPS)).exists()
  assert (workdir / "diffusion" / "checkpoints" / str(STEPS)).exists()
  for stage in ("vqgan", "diffusion"):
    record = json.loads((workdir / stage / "time_budget_stop.json").read_text())
    assert record["stopped_at_step"] == STEPS and record["num_steps"] == 2 * STEPS
  info = json.loads((workdir / "samples" / "000" / "samples.json").read_text())
  assert (info["step"], info["num_videos"], info["num_steps"]) == (STEPS, 4, COMMON["SAMPLE_STEPS"])
  assert count_videos(displays) == (2, 4)  # reconstructions and sample grid; 4 videos


def test_load_checkpoint_notebook_restores_both_stages_and_shows_samples(demo_run, tmp_path):
  _, workdir = demo_run
  # No checkout and no config: the package and the workdir's recorded config are enough.
  parameters = {key: value for key, value in COMMON.items() if key not in ("REPO_DIR", "CONFIG")}
  written = tmp_path / "samples"
  notebook = execute("load_checkpoint.ipynb", {**parameters, "WORKDIR": str(workdir), "LABEL": 2,
                                               "OUTPUT_DIR": str(written)}, tmp_path)
  text, displays = outputs(notebook)
  assert f"Tokenizer: stage-1 checkpoint at step {STEPS}." in text
  assert (f"Diffusion model: stage-2 checkpoint at step {STEPS}, trained on tokenizer step "
          f"{STEPS}") in text
  assert "Sampled 4 videos of shape (8, 16, 16, 3), classes [2, 2, 2, 2]." in text
  assert "Latents (4, 2, 4, 4, 4); round trip (4, 8, 16, 16, 3) uint8." in text
  assert count_videos(displays) == (2, 4)  # sample grid and tokenizer round trip; 4 videos
  assert f"Writing the videos to {written}." in text
  assert sorted(path.name for path in written.iterdir()) == [
      "grid.gif", "tokenizer.gif", *(f"video_{index:03d}_class_2.mp4" for index in range(4))]
