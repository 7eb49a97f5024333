"""`--mode=evaluate` and rFVD end to end on the tiny config, the reference cache, C3D and IS."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config, untrained_checkpoints

from vqvdm_jax import config as config_lib
from vqvdm_jax import main as main_lib
from vqvdm_jax.data import pipeline
from vqvdm_jax.evaluation import c3d, evaluate, evaluate_vqgan
from vqvdm_jax.inference import sampling

# One device: I3D runs at 16x224x224 (~2 s a clip on 2 CPU cores); a batch padded to the eight
# simulated devices would cost eight clips for every four.
DEVICES = jax.devices()[:1]
TINY_C3D_WIDTHS = (2, 2, 3, 3, 4, 4, 4, 4)


STEP = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """Checkpoints of both tiny stages and one evaluation without C3D weights."""
  workdir = tmp_path_factory.mktemp("evaluate")
  config = load_config("tiny")
  config.evaluation.reference_dir = str(workdir / "reference_features")
  untrained_checkpoints(config, workdir, DEVICES, STEP)
  results = evaluate.evaluate(config, workdir, devices=DEVICES)
  return config, workdir, results


def test_evaluate_mode_is_registered():
  assert "evaluate" in main_lib.MODES


def test_results_json_carries_the_numbers_and_every_protocol_field(trained):
  config, workdir, results = trained
  written = json.loads((workdir / "eval" / "000" / "results.json").read_text())
  assert written == results
  assert np.isfinite(written["fvd"]) and written["fvd"] >= 0 and np.isfinite(written["kvd"])
  assert written["inception_score"] is None and "c3d_weights" in written["inception_score_skipped"]
  assert written["num_samples_fvd"] == written["num_reference_clips"] == 2
  assert written["checkpoint_step"] == written["tokenizer_step"] == STEP
  sample = config.diffusion.sample
  assert (written["guidance_scale"], written["sampler"], written["num_steps"]) == (
      sample.guidance_scale, sample.sampler, sample.num_steps)
  # The reference (the first 2 train clips) holds classes 0 and 1; so do the samples.
  assert written["class_counts_fvd"] == {"0": 1, "1": 1}
  fvd = written["protocol"]["fvd"]
  assert (fvd["frames"], fvd["resolution"]) == (16, [224, 224])
  assert "logits" in fvd["features"] and "bilinear" in fvd["resize"]
  assert "[-1, 1]" in fvd["value_range"] and "float64" in fvd["statistic"]
  assert "unbiased" in written["protocol"]["kvd"]["estimator"]
  assert "none" in written["protocol"]["kvd"]["scaling"]
  assert written["protocol"]["inception_score"]["splits"] == config.evaluation.is_splits
  # 8-frame clips are not the standard protocol, and the file says so.
  assert any("8 frames" in d for d in written["protocol"]["deviations"])
  assert written["reference"]["split"] == "train"


def _tiny_c3d_file(path, num_classes=5):
  """Random C3D weights in the documented format, at tiny widths."""
  module = c3d.C3D(widths=TINY_C3D_WIDTHS, fc_width=8, num_classes=num_classes)
  params = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 112, 112, 3)))["params"]
  arrays = {f"{layer}/{part}": np.asarray(params[layer][part])
            for layer in c3d.CONV_LAYERS + c3d.FC_LAYERS for part in ("kernel", "bias")}
  np.savez(path, mean=np.array([100.0, 110.0, 120.0]), **arrays)
  return path


def test_inception_score_uses_the_named_c3d_file_and_the_reference_cache(trained, tmp_path,
                                                                         monkeypatch):
  config, workdir, first = trained
  config = load_config("tiny")
  config.evaluation.reference_dir = str(workdir / "reference_features")
  # A classifier whose output ignores the clip: IS = exp(E KL(p(y|x) || p(y))) is then exactly 1,
  # whatever its (non-uniform) distribution; a pipeline that mixed up splits, logits and
  # probabilities or clips would not give 1.
  path = _tiny_c3d_file(tmp_path / "c3d.npz")
  weights = dict(np.load(path))
  weights["fc8/kernel"] = np.zeros_like(weights["fc8/kernel"])
  weights["fc8/bias"] = np.array([3.0, 1.0, 0.0, -1.0, 0.5], np.float32)
  np.savez(path, **weights)
  config.evaluation.c3d_weights = str(path)
  config.evaluation.num_samples_is = 4  # 2 shared with FVD + 2 more
  config.evaluation.is_splits = 2

  def must_not_read(*args, **kwargs):
    raise AssertionError("the reference features are cached; no real clip should be read")

  monkeypatch.setattr(pipeline, "ordered_batches", must_not_read)
  results = evaluate.evaluate(config, workdir, devices=DEVICES)
  assert results["num_samples_is"] == 4
  assert results["inception_score"] == pytest.approx(1.0, abs=1e-5)
  assert results["inception_score_std"] == pytest.approx(0.0, abs=1e-5)
  assert "inception_score_skipped" not in results
  # The same seed and checkpoint give the same FVD set, hence the same FVD.
  assert results["fvd"] == pytest.approx(first["fvd"], rel=1e-6)
  # Each evaluation writes its own folder: the first results file is still the first's.
  assert json.loads((workdir / "eval" / "000" / "results.json").read_text()) == first
  assert json.loads((workdir / "eval" / "001" / "results.json").read_text()) == results


def _reference_clips_as_samples(config, count):
  """Stands in for the sampler: yields the reference clips themselves (uint8, in order)."""
  clips = np.concatenate([batch["video"] for batch in pipeline.ordered_batches(
      config.data, config.evaluation.reference_split, count, count, config.seed)])

  def generate_batches(model, labels, fps, seed, config=None):
    del model, fps, seed, config
    assert len(labels) == count
    yield clips
  return clips, generate_batches


def test_fvd_is_zero_for_the_reference_clips_and_large_for_other_clips(trained, monkeypatch):
  """End to end through `evaluate`: generated clips equal to the reference give FVD ~ 0 (the two
  paths preprocess alike and pair the same features); the untrained model's samples do not."""
  config, workdir, first = trained
  _, as_samples = _reference_clips_as_samples(config, config.evaluation.num_samples_fvd)
  monkeypatch.setattr(sampling, "generate_batches", as_samples)
  same = evaluate.evaluate(config, workdir, devices=DEVICES)
  assert first["fvd"] > 1.0
  assert abs(same["fvd"]) < 1e-4 * first["fvd"], (same["fvd"], first["fvd"])
  assert same["kvd"] < first["kvd"]


def test_evaluate_vqgan_adds_rfvd_of_reconstructions(trained):
  _, workdir, _ = trained
  config = load_config("tiny")
  config.evaluation.reconstruction_fvd = True
  config.vqgan.eval.num_clips = config.vqgan.eval.batch_size = 2  # I3D batch: 2 clips
  results = evaluate_vqgan.evaluate_vqgan(config, workdir, devices=DEVICES)
  assert np.isfinite(results["rfvd"]) and results["rfvd"] >= 0
  assert results["rfvd_protocol"]["frames"] == 16 and results["rfvd_protocol"]["deviations"]


def test_generated_classes_follow_the_reference_distribution():
  labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
  fps = np.array([4.0, 8.0] * 3 + [16.0] * 3 + [2.0])
  out_labels, out_fps = evaluate.conditioning_like(labels, fps, 20, seed=0)
  assert np.bincount(out_labels).tolist() == [12, 6, 2]
  assert sorted(out_fps[out_labels == 0].tolist()) == [4.0] * 6 + [8.0] * 6
  assert set(out_fps[out_labels == 2].tolist()) == {2.0}
  # Largest remainder: 7 clips of a 6:3:1 split are 4:2:1, never 5 of class 0.
  assert np.bincount(evaluate.conditioning_like(labels, fps, 7, 0)[0]).tolist() == [4, 2, 1]


def test_evaluation_fields_are_validated_at_start_up():
  config = load_config("tiny")
  config.evaluation.num_samples_fvd = 1
  with pytest.raises(config_lib.ConfigError, match="evaluation.num_samples_fvd"):
    config_lib.validate(config)
  config = load_config("tiny")
  config.evaluation.num_samples_is = 5  # fewer than the 10 splits
  with pytest.raises(config_lib.ConfigError, match="evaluation.num_samples_is"):
    config_lib.validate(config)


class _RecordingExtractor:
  """Stands in for a network: one feature (the clip's id) per clip; records call sizes."""

  batch_size = 4

  def __init__(self):
    self.calls = []

  def __call__(self, videos):
    self.calls.append(len(videos))
    return videos[:, :1].astype(np.float32)


def test_generated_clips_reach_the_networks_in_full_batches_and_exact_counts():
  i3d_net, c3d_net = _RecordingExtractor(), _RecordingExtractor()
  batches = (np.arange(start, min(start + 3, 10)).reshape(-1, 1) for start in range(0, 10, 3))
  fake, probabilities = evaluate.score_generated(batches, 10, i3d_net, 6, c3d_net, 10)
  assert fake[:, 0].tolist() == list(range(6))
  assert probabilities[:, 0].tolist() == list(range(10))
  assert c3d_net.calls == [4, 4, 2]  # batches of 3 regrouped into 4s; the rest at the end
  assert i3d_net.calls == [4, 2]  # only the FVD set's 6 clips
