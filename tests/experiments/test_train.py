"""The toy model's training and probes (experiments/toy/) and experiments/synthetic/make_artifacts.py end to end at
smoke size; load_default's errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import models, tasks
from experiments.synthetic import make_artifacts, synthetic
from experiments.toy import probe_answers, probe_format, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = tmp_path_factory.mktemp("tiny_model")
  result = train_tiny.main(["--tiny", "--out", str(out)])
  return out, result


def test_train_tiny_writes_a_loadable_model(trained):
  out, result = trained
  for name in ("config.json", "train_log.jsonl", "scores.json"):
    assert (out / name).is_file()
  scores = json.loads((out / "scores.json").read_text())
  assert scores["steps_run"] == 3 and "average" in scores["final_eval"]["128"]
  assert scores["command"].startswith("python experiments/toy/train_tiny.py --tiny") and scores["machine"]["jax"]
  assert set(scores["answer_positions"]["128"]) == set(tasks.TASK_NAMES)
  log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in log if "loss" in r)
  config, params = models.load_default(out)
  assert config.vocab_size == 398 and config.max_seq_len == 192
  toks = jnp.ones((1, 20), jnp.int32)
  out_tokens, count, _ = models.generate(config, params, toks, jnp.array([20]), akv.presets.get("full"), 4)
  assert out_tokens.shape == (1, 4) and int(count[0]) == 4


def test_make_artifacts_from_the_model(trained, tmp_path):
  out, _ = trained
  path = tmp_path / "art.npz"
  art = make_artifacts.main(["--out", str(path), "--model_path", str(out), "--length", "128", "--batch", "3",
                             "--window", "16", "--tasks", "niah_single,common_words"])
  loaded = synthetic.load_artifact(path)
  l, b, kh, s, h = loaded["k"].shape
  assert (l, b, kh, s, h) == (1, 3, 1, 128, 16)
  assert loaded["q_obs"].shape == (1, 3, 2, 16, 16)
  np.testing.assert_allclose(loaded["k"], art["k"], rtol=1e-6)
  # The captured keys are the model's: a full-policy compress of them reproduces dense attention.
  kv = akv.DenseKV(k=jnp.asarray(loaded["k"][0]), v=jnp.asarray(loaded["v"][0]), lengths=jnp.asarray(loaded["lengths"]))
  q = jnp.asarray(loaded["q_test"][0, :, :, 0])
  np.testing.assert_allclose(akv.attend(q, akv.compress(kv, akv.presets.get("full"))),
                             akv.dense_attention(q, kv.k, kv.v, kv.lengths), rtol=1e-5, atol=1e-5)


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="no trained model at"):
    models.load_default(tmp_path)
  with pytest.raises(SystemExit, match=r"unknown config field\(s\) \['lrr'\]"):
    train_tiny.main(["--tiny", "--set", "lrr=1", "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match="must look like key=value"):
    train_tiny.main(["--tiny", "--set", "lr", "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match="final_mix"):
    train_tiny.main(["--tiny", "--set", "final_mix=[1.0]", "--out", str(tmp_path)])
  with pytest.raises(SystemExit, match="No such file"):
    train_tiny.main(["--config", str(tmp_path / "missing.yaml")])
  # A smoke run without --out keeps off the shipped model.
  assert train_tiny.parse(["--tiny"]).out == "akv_jax/models/default-tiny"
  assert train_tiny.parse(["--tiny", "--out", str(tmp_path)]).out == str(tmp_path)
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    make_artifacts.main(["--out", str(tmp_path / "a.npz"), "--tasks", "nope"])


def test_lookup_probe(trained, tmp_path, monkeypatch):
  from experiments.toy import probe_lookup  # noqa: PLC0415
  out, result = trained
  assert set(result["lookup"]) == {"queries", "accuracy", "latest", "uniform"}
  got = probe_lookup.main(["--model_path", str(out), "--lengths", "64", "128", "--rows", "4", "--pairs", "4",
                           "--out", str(tmp_path / "probe.json")])
  assert json.loads((tmp_path / "probe.json").read_text()) == got
  for r in got["by_length"].values():
    assert r["queries"] > 0 and 0 <= r["accuracy"] <= 1 and 0 <= r["latest"] <= 1 and 0 < r["uniform"] <= 1
  config, params = models.load_default(out)
  with pytest.raises(ValueError, match="length=4096 exceeds the model's max_seq_len=192"):
    probe_lookup.lookup_accuracy(config, params, length=4096)
  # A model that always predicts the true next token scores 1: the probe reads the prediction at the queried key.
  oracle = lambda config, params, toks: jax.nn.one_hot(jnp.roll(toks, -1, axis=1), config.vocab_size)  # noqa: E731
  monkeypatch.setattr(probe_lookup.models, "forward", oracle)
  assert probe_lookup.lookup_accuracy(config, params, length=128, pairs=4, rows=4)["accuracy"] == 1.0


def test_probe_format_streams():
  vocab = tasks.Vocab()
  for fmt in probe_format.FORMATS:
    toks, mask, probes = probe_format.stream(np.random.default_rng(0), fmt, 256, vocab, 8)
    assert toks.shape == mask.shape == (256,) and len(probes) > 5
    for pos, truth, latest in probes:
      # The probed position is the last query token: teacher forcing puts the first answer id right after it.
      assert toks[pos + 1] == truth and mask[pos + 1] and not mask[pos]
      assert latest in vocab.value_ids
  # "plain" is the library's own recall stream, draw for draw.
  plain = probe_format.stream(np.random.default_rng(3), "plain", 300, vocab, 16)
  lib = tasks.recall_stream(np.random.default_rng(3), 300, vocab, 16)
  np.testing.assert_array_equal(plain[0], lib[0])
  np.testing.assert_array_equal(plain[1], lib[1])
  np.testing.assert_array_equal([p for p, _, _ in plain[2]], tasks.recall_queries(lib[0])["position"])


def test_probe_format_tiny_run(tmp_path):
  out = tmp_path / "pf.json"
  got = probe_format.main(["--tiny", "--formats", "plain", "marker", "--no_progress", "--out", str(out)])
  assert json.loads(out.read_text()) == got
  assert list(got["formats"]) == ["plain", "marker"]
  for r in got["formats"].values():
    assert [c["step"] for c in r["curve"]] == [0, 2, 4] and 0 <= r["final_accuracy"] <= 1 and r["queries"] > 0
  with pytest.raises(SystemExit, match="--steps=0 must be >= 1"):
    probe_format.main(["--steps", "0"])
  with pytest.raises(SystemExit, match=r"--min_lr_frac=2.0 must be in \[0, 1\]"):
    probe_format.main(["--min_lr_frac", "2"])


def test_draw_batch_weights_every_predictable_body_word():
  """Word-task rows carry body_weight on each body word after the first (all of them predictable from the words
  before), and nothing on the frame; the answer keeps weight 1."""
  cfg = train_tiny.parse(["--tiny", "--set", "task_names=[common_words]", "--set", "body_weight=0.5"])
  length = 64
  toks, mask, weights = train_tiny.draw_batch(cfg, 0, length, recall=False)
  vocab = tasks.Vocab()
  for row in range(toks.shape[0]):
    words = np.flatnonzero((toks[row, :length] >= vocab.word_ids.start) & (toks[row, :length] < vocab.word_ids.stop))
    assert words[0] == 2 and words[-1] == length - 2 and toks[row, length - 1] == tasks.vocab.QUERY
    weighted = np.flatnonzero((weights[row] > 0) & ~mask[row])
    np.testing.assert_array_equal(weighted, words[1:])
    np.testing.assert_allclose(weights[row, weighted].sum(), 0.5 * mask[row].sum(), rtol=1e-6)
    np.testing.assert_array_equal(weights[row, mask[row]], 1.0)


def test_answer_positions_probe(trained, tmp_path, monkeypatch):
  out, _ = trained
  got = probe_answers.main(["--model_path", str(out), "--lengths", "64", "--rows", "3", "--batch", "2",
                            "--tasks", "niah_multivalue", "common_words", "--out", str(tmp_path / "p.json")])
  assert json.loads((tmp_path / "p.json").read_text()) == got
  table = got["by_length"]["64"]
  assert set(table) == {"niah_multivalue", "common_words"}
  # Three ranked words and EOS, for every row; multi-value answers vary in length, so later positions have fewer.
  assert table["common_words"]["rows"] == [3, 3, 3, 3]
  assert table["niah_multivalue"]["rows"][0] == 3 and table["niah_multivalue"]["rows"] == sorted(
      table["niah_multivalue"]["rows"], reverse=True)
  for t in table.values():
    assert all(0 <= x <= 1 for key in ("accuracy", "prob", "repeat_prob") for x in t[key])
    assert t["repeat_prob"][0] == 0   # nothing said yet

  config, params = models.load_default(out)
  # A model sure of the true next token: accuracy and prob 1 everywhere, nothing on repeats.
  oracle = lambda config, params, toks: 50.0 * jax.nn.one_hot(jnp.roll(toks, -1, axis=1), config.vocab_size)  # noqa: E731
  monkeypatch.setattr(probe_answers.models, "forward", oracle)
  perfect = probe_answers.answer_positions(config, params, length=64, task_names=("frequent_words",), rows=2)
  assert perfect["frequent_words"]["accuracy"] == [1.0] * 4 and perfect["frequent_words"]["prob"] == [1.0] * 4
  assert perfect["frequent_words"]["repeat_prob"] == [0.0] * 4
  # One that repeats the first answer word: its probability shows up as repeat_prob from position 1 on.
  def parrot(config, params, toks):
    first = toks[:, 64]   # teacher forcing puts the first answer token right after the 64 prompt tokens
    return 50.0 * jax.nn.one_hot(jnp.broadcast_to(first[:, None], toks.shape), config.vocab_size)
  monkeypatch.setattr(probe_answers.models, "forward", parrot)
  stuck = probe_answers.answer_positions(config, params, length=64, task_names=("frequent_words",), rows=2)
  assert stuck["frequent_words"]["accuracy"] == [1.0, 0.0, 0.0, 0.0]
  assert stuck["frequent_words"]["repeat_prob"] == [0.0, 1.0, 1.0, 1.0]

  with pytest.raises(ValueError, match="length=4096 plus the longest answer is 4100 tokens, over the model's "
                                       "max_seq_len=192"):
    probe_answers.answer_positions(config, params, length=4096, task_names=("common_words",))
  with pytest.raises(ValueError, match="rows=0 and batch=16 must be >= 1"):
    probe_answers.answer_positions(config, params, length=64, rows=0)
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    probe_answers.main(["--model_path", str(out), "--tasks", "nope"])
