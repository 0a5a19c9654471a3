"""experiments/bench_peers.py without its peers: flags and their errors, cache byte counting on plain arrays and
stand-in objects, the result schema, prompt building and the tokenizer check. CI does not install the peers extra
(torch, transformers, kvpress); the few tests that need it skip without it."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments import bench_peers as bp  # noqa: E402

SMOLLM2 = dict(layers=30, kv_heads=3, head_dim=64)


# ------------------------------------------------------------------------------------------------ flags


def test_module_imports_without_torch():
  code = ("import sys; sys.path.insert(0, %r); import experiments.bench_peers as b; "
          "assert 'torch' not in sys.modules and 'kvpress' not in sys.modules and 'transformers' not in sys.modules"
          % str(REPO))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_defaults():
  a = bp.parse_args([])
  assert a.tasks == bp.DEFAULT_TASKS and a.presses == tuple(bp.PRESSES) and a.ratios == (0.5, 0.75, 0.875)
  assert (a.length, a.samples, a.threads, a.prefill, a.timing_samples, a.max_new_tokens) == \
      (4096, 2, 2, "shared", 1, bp.DEFAULT_TOKEN_CAP)


def test_lists_parse_trim_and_dedupe():
  a = bp.parse_args(["--tasks", " niah_multikey, common_words ,niah_multikey", "--presses", "knorm,tova,knorm",
                     "--ratios", "0.5, 0,0.5,0.875", "--length", "1024", "--samples", "1", "--prefill", "per-press"])
  assert a.tasks == ("niah_multikey", "common_words")
  assert a.presses == ("knorm", "tova")
  assert a.ratios == (0.5, 0.0, 0.875)
  assert (a.length, a.samples, a.prefill) == (1024, 1, "per-press")


@pytest.mark.parametrize("argv, words", [
    (["--presses", "snapkv,h2o"], ["unknown press", "'h2o'", "snapkv"]),
    (["--presses", ","], ["no press"]),
    (["--tasks", "niah_single_noise,qa_squad"], ["unknown task", "'qa_squad'", "niah_multikey"]),
    (["--ratios", "0.5,1"], ["ratio '1'", "outside [0, 1)"]),
    (["--ratios", "1.0"], ["ratio '1.0'", "outside [0, 1)"]),
    (["--ratios", "-0.25"], ["ratio '-0.25'", "outside [0, 1)"]),
    (["--ratios", "nan"], ["ratio 'nan'", "outside [0, 1)"]),
    (["--ratios", "half"], ["ratio 'half'", "not a number"]),
    (["--ratios", ""], ["no ratio"]),
    (["--length", "0"], ["--length '0'", ">= 1"]),
    (["--samples", "two"], ["--samples 'two'", "not an integer"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens '0'"]),
    (["--timing-samples", "-1"], ["--timing-samples '-1'"]),
    (["--warmup-tokens", "64"], ["--warmup-tokens '64'", ">= 128"]),
    (["--prefill", "twice"], ["--prefill", "'twice'"]),
])
def test_bad_flags_exit_naming_the_value(argv, words, capsys):
  with pytest.raises(SystemExit) as e:
    bp.parse_args(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err
  for w in words:
    assert w in err, (w, err)


def test_parse_helpers_raise_value_error():
  with pytest.raises(ValueError, match="unknown press 'x'"):
    bp.parse_names("x", bp.PRESSES, "press")
  with pytest.raises(ValueError, match="outside"):
    bp.parse_ratios("0.99,1.5")
  assert bp.parse_ratios("0.875") == (0.875,)
  with pytest.raises(ValueError, match="unknown press 'h2o'"):
    bp.make_press("h2o", 0.5)  # checked before kvpress is imported
  assert bp.make_press(bp.FULL, 0.0) is None


def test_configurations_put_the_full_cache_first():
  assert bp.configurations(["snapkv", "knorm"], [0.5, 0.75]) == [
      ("full", 0.0), ("snapkv", 0.5), ("snapkv", 0.75), ("knorm", 0.5), ("knorm", 0.75)]


def test_token_caps_take_the_smaller_of_cap_and_task():
  caps = bp.token_caps(["niah_single_noise", "variable_tracking", "common_words"], 64)
  assert caps == {"niah_single_noise": 64, "variable_tracking": 30, "common_words": 64}
  assert bp.token_caps(["niah_single_noise"], 500) == {"niah_single_noise": 128}


def test_main_without_peers_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError, installed or not
  with pytest.raises(SystemExit, match="peers extra"):
    bp.main(["--samples", "1"])


# ------------------------------------------------------------------------------------------------ bytes


class Layer:
  def __init__(self, keys, values):
    self.keys, self.values = keys, values


def kv(tokens, dtype=np.float32, heads=3, dim=64):
  return np.zeros((1, heads, tokens, dim), dtype), np.zeros((1, heads, tokens, dim), dtype)


def test_tensor_bytes_of_arrays_and_stand_ins():
  assert bp.tensor_bytes(np.zeros((1, 3, 10, 64), np.float32)) == 3 * 10 * 64 * 4
  assert bp.tensor_bytes(np.zeros((2, 5), np.float16)) == 20
  assert bp.tensor_bytes(None) == 0
  # Only .shape and .dtype.itemsize, as a torch dtype has; or an element_size() method, as a torch tensor has.
  assert bp.tensor_bytes(types.SimpleNamespace(shape=(1, 3, 7, 64), dtype=types.SimpleNamespace(itemsize=2))) == \
      3 * 7 * 64 * 2
  assert bp.tensor_bytes(types.SimpleNamespace(shape=[4, 4], element_size=lambda: 8, dtype=None)) == 128
  with pytest.raises(ValueError, match="element size"):
    bp.tensor_bytes(types.SimpleNamespace(shape=(2,), dtype="float32"))


def test_cache_structures_give_the_same_count():
  layers = [kv(100), kv(50), kv(25)]
  expected = sum(k.nbytes + v.nbytes for k, v in layers)
  new = types.SimpleNamespace(layers=[Layer(k, v) for k, v in layers])            # transformers >= 4.56
  old = types.SimpleNamespace(key_cache=[k for k, _ in layers], value_cache=[v for _, v in layers])
  legacy = tuple(layers)                                                          # tuple of (keys, values)
  for cache in (new, old, legacy):
    assert bp.cache_bytes(cache) == expected
    assert bp.cache_tokens(cache) == [100, 50, 25]


def test_unfilled_layers_and_mixed_dtypes():
  k, v = kv(10, np.float16)
  cache = types.SimpleNamespace(layers=[Layer(k, v), Layer(None, None), types.SimpleNamespace()])
  assert bp.cache_bytes(cache) == k.nbytes + v.nbytes
  assert bp.cache_tokens(cache) == [10, 0, 0]


def test_cache_without_tensors_is_an_error():
  with pytest.raises(ValueError, match="cannot find the key/value tensors of a int"):
    bp.cache_layers(3)


def test_masked_bytes_count_key_and_value_per_pair():
  cache = types.SimpleNamespace(layers=[Layer(*kv(100)), Layer(*kv(100))])
  assert bp.masked_bytes(cache, [10, 0]) == 10 * (64 * 4 + 64 * 4)
  assert bp.masked_bytes(cache, [0, 0]) == 0


def test_dense_bytes_formula():
  assert bp.dense_bytes(**SMOLLM2, tokens=4096) == 2 * 30 * 3 * 4096 * 64 * 2 == 94_371_840
  assert bp.dense_bytes(**SMOLLM2, tokens=4096, bytes_per_element=4) == 2 * 94_371_840


# ------------------------------------------------------------------------------------------------ results


def record(task, score, held, steps=3, ttft=None, index=0):
  return dict(task=task, index=index, path="replay" if ttft is None else "real", prediction="x", score=score,
              new_tokens=steps + 1, prompt_tokens=1000, context_tokens=960, question_forward="one pass",
              bytes_held=held, bytes_unmasked=held,
              dense_bytes=bp.dense_bytes(**SMOLLM2, tokens=960),
              dense_bytes_fp32=bp.dense_bytes(**SMOLLM2, tokens=960, bytes_per_element=4), tokens_held=480.0,
              ttft_ms=ttft, decode_steps=steps, decode_ms=steps * 50.0)


def fake_result(tasks=("niah_single_noise", "common_words")):
  recs = [record(tasks[0], 1.0, 100, ttft=900.0), record(tasks[0], 0.0, 100, index=1), record(tasks[1], 0.5, 100)]
  results = [bp.summarize(p, r, recs, tasks, 12.0) for p, r in bp.configurations(["snapkv"], [0.5])]
  machine = bp.machine_info(2)
  return dict(command="python experiments/bench_peers.py", script="experiments/bench_peers.py", started="now",
              machine=machine, model={}, setting=dict(tasks=list(tasks)), tokenizer_check={}, results=results,
              timings={})


def test_accuracy_per_task_then_average():
  recs = [record("a", 1.0, 1), record("a", 0.0, 1), record("b", 0.25, 1)]
  assert bp.accuracy(recs, ["a", "b", "c"]) == {"a": 0.5, "b": 0.25, "average": 0.375}


def test_summarize_means_and_times():
  recs = [record("a", 1.0, 100, steps=2, ttft=800.0), record("a", 0.0, 300, steps=6)]
  s = bp.summarize("knorm", 0.5, recs, ["a"], 3.0)
  assert list(s) == list(bp.RESULT_KEYS)
  assert s["bytes_held"] == 200 and s["ttft_ms"] == 800.0 and s["ttft_samples"] == 1
  assert s["tpot_ms"] == 50.0  # decode time over decode steps, all samples together
  assert s["dense_bytes"] == bp.dense_bytes(**SMOLLM2, tokens=960)
  assert [r["path"] for r in s["samples"]] == ["real", "replay"]
  assert all(set(r) == set(bp.SAMPLE_KEYS) for r in s["samples"])


def test_result_schema_and_its_checks():
  r = fake_result()
  assert bp.check_result(r) == []
  json.dumps(r)  # serializable
  bad = fake_result()
  del bad["timings"]
  bad["results"][1]["accuracy"]["average"] = 1.5
  bad["results"][1]["bytes_unmasked"] = bad["results"][1]["bytes_held"] + 1
  bad["results"][0]["press"] = "snapkv"
  del bad["results"][1]["accuracy"]["common_words"]
  problems = bp.check_result(bad)
  assert "missing key 'timings'" in problems
  assert any("average=1.5" in p for p in problems)
  assert any("bytes_unmasked > bytes_held" in p for p in problems)
  assert any("lacks 'common_words'" in p for p in problems)
  assert "results[0] is not the full cache" in problems


def test_machine_info_without_importing_torch():
  m = bp.machine_info(2)
  assert m["torch_threads"] == 2 and m["cores"] >= 1 and isinstance(m["cpu"], str) and m["cpu"]
  assert {"torch", "transformers", "kvpress", "gguf"} <= set(m)


# ------------------------------------------------------------------------------------------------ prompts


@pytest.fixture(scope="module")
def smollm2():
  from akv_jax import models

  try:
    path = models.smollm2_path()
  except ValueError as e:
    pytest.skip(str(e))
  return models.load_gguf_tokenizer(path), bp.chat_fn(models.load_chat_template(path))


def test_first_mismatch():
  assert bp.first_mismatch([1, 2, 3], [1, 2, 3]) is None
  assert bp.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
  assert bp.first_mismatch([1, 2], [1, 2, 3]) == 2


def test_prompts_are_akv_jax_samples_and_split_where_their_ids_do(smollm2):
  tok, chat = smollm2
  prompts = bp.build_prompts(["niah_single_noise", "variable_tracking"], 2, 1024, tok, chat, seed=0)
  assert list(prompts) == ["niah_single_noise", "variable_tracking"]
  from akv_jax.tasks import text

  assert bp.task_seeds(["niah_single_noise", "variable_tracking"], 5) == {"niah_single_noise": 5,
                                                                          "variable_tracking": 1005}
  for (task, samples), seed in zip(prompts.items(), (0, 1000)):
    assert samples == text.make_samples(task, 2, 1024, tok, chat=chat, seed=seed)
    for s in samples:
      head, tail = bp.rendered_parts(s, chat)
      assert head.startswith("<|im_start|>system") and tail.endswith(s.answer_prefix)
      assert "<|im_start|>assistant\n" in tail
      enc = lambda x: tok.encode(x, add_special_tokens=False).ids  # noqa: E731
      assert tuple(enc(head)) == s.context_ids and tuple(enc(tail)) == s.question_ids
      assert s.length <= 1024


def test_tokenizer_check_reports_the_first_difference(smollm2):
  tok, chat = smollm2
  prompts = bp.build_prompts(["niah_single_noise"], 2, 400, tok, chat)
  enc = lambda x: tok.encode(x, add_special_tokens=False).ids  # noqa: E731
  dec = lambda ids: tok.decode(list(ids))  # noqa: E731
  same = bp.tokenizer_check(prompts, chat, enc, dec)
  assert same == dict(prompts=2, same_ids_halves=2, same_ids_whole=2, mismatches=[])
  # A tokenizer that differs from ours: here, one that drops the first id of any text holding the assistant header,
  # so the ids part at the start of the question (the head holds the context only).
  other = bp.tokenizer_check(prompts, chat, lambda x: enc(x)[1:] if "<|im_start|>assistant" in x else enc(x), dec)
  assert other["same_ids_halves"] == 0 and len(other["mismatches"]) == 2
  m = other["mismatches"][0]
  assert m["task"] == "niah_single_noise" and m["position"] == len(prompts["niah_single_noise"][0].context_ids)


# ------------------------------------------------------------------------------------------------ with torch


def test_cache_bytes_of_a_transformers_dynamic_cache():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cache = transformers.DynamicCache()
  for i, n in enumerate((40, 20)):
    cache.update(torch.zeros(1, 3, n, 64), torch.zeros(1, 3, n, 64), i)
  assert bp.cache_bytes(cache) == 2 * 3 * 64 * 4 * (40 + 20)
  assert bp.cache_tokens(cache) == [40, 20]


def test_presses_are_kvpress_presses_at_the_ratio():
  kvpress = pytest.importorskip("kvpress")
  for name in bp.PRESSES:
    press = bp.make_press(name, 0.75)
    assert isinstance(press, kvpress.BasePress) and press.compression_ratio == 0.75
  assert isinstance(bp.make_press("adakv_snapkv", 0.5).press, kvpress.SnapKVPress)
