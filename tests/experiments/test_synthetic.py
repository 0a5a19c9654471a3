"""End-to-end tests of the synthetic-data runner (experiments/synthetic/): artifacts, the quality benchmark and
config-driven runs.

Axis legend: L layers, B batch, K kv heads, N query heads, S prompt tokens, H head dim, W observation queries,
T test queries. Every artifact here is tiny (S <= 512, H = 64) so each test stays within a few seconds of
compilation. The structure tests hold with margin for every seed we tried (0..39), not just the one used here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import yaml

import akv_jax as akv

REPO = pathlib.Path(__file__).resolve().parents[2]
# experiments/ is not part of the installed package (scripts, not library): import it from the checkout, which
# `python -m pytest` does on its own but a bare `pytest` does not.
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments.synthetic import run_proxy_experiment as proxy  # noqa: E402
from experiments.synthetic import run_quality_benchmarks, synthetic  # noqa: E402

TINY = synthetic.SyntheticConfig(**proxy.TINY_ARTIFACT, seed=3)


@pytest.fixture(scope="module")
def artifact():
  return synthetic.generate(TINY)


@pytest.fixture(scope="module")
def npz_path(artifact, tmp_path_factory):
  path = tmp_path_factory.mktemp("artifact") / "tiny.npz"
  synthetic.save_artifact(path, artifact)
  return path


def _attention(artifact, name: str) -> list[tuple[int, int, np.ndarray]]:
  """Per (layer, row, kv head): (layer, row, f64[length] attention of `name` queries, averaged over G and T)."""
  l, b, kh, _, h = artifact["k"].shape
  g = artifact[name].shape[2] // kh
  out = []
  for layer in range(l):
    for row in range(b):
      length = int(artifact["lengths"][row])
      for head in range(kh):
        k = artifact["k"][layer, row, head, :length].astype(np.float64)
        q = artifact[name][layer, row, head * g:(head + 1) * g].astype(np.float64)    # [G, T, H]
        logits = q @ k.T / np.sqrt(h)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out.append((layer, row, head, (p / p.sum(-1, keepdims=True)).mean((0, 1))))
  return out


# Synthetic artifacts.


def test_artifact_shapes_dtypes_and_padding(artifact):
  c = TINY
  assert artifact["k"].shape == artifact["v"].shape == (c.layers, c.batch, c.kv_heads, c.seq_len, c.head_dim)
  assert artifact["q_obs"].shape == (c.layers, c.batch, c.q_heads, c.window, c.head_dim)
  assert artifact["q_test"].shape == (c.layers, c.batch, c.q_heads, c.test_queries, c.head_dim)
  assert artifact["k"].dtype == np.float32 and artifact["lengths"].dtype == np.int32
  lengths = artifact["lengths"]
  assert lengths[0] == c.seq_len and np.all(lengths >= c.min_length) and np.all(lengths <= c.seq_len)
  assert lengths.min() < c.seq_len, "TINY should exercise a ragged batch"
  for row, length in enumerate(lengths):
    assert np.all(artifact["k"][:, row, :, length:] == 0) and np.all(artifact["v"][:, row, :, length:] == 0)
  for key in ("k", "v", "q_obs", "q_test"):
    x = artifact[key]
    assert np.all(np.isfinite(x))
    err = np.linalg.norm(x.astype(np.float32) - _bf16_round_trip(x)) / np.linalg.norm(x)
    assert err < 1e-2, f"{key} does not survive a bf16 cast: relative error {err}"
  json.dumps(artifact["meta"])  # json-able


def _bf16_round_trip(x: np.ndarray) -> np.ndarray:
  import jax.numpy as jnp
  return np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))


def test_artifact_is_a_function_of_its_seed(artifact):
  again = synthetic.generate(TINY)
  for key in synthetic.ARRAY_KEYS:
    np.testing.assert_array_equal(again[key], artifact[key])
  other = synthetic.generate(dataclasses.replace(TINY, seed=TINY.seed + 1))
  assert not np.allclose(other["k"], artifact["k"])


def test_sinks_heavy_hitters_and_recent_tokens_draw_attention(artifact):
  z = artifact["meta"]["n_sink"]
  vs_uniform, vs_background = {"sink": [], "heavy": [], "recent": []}, {"sink": [], "heavy": [], "recent": []}
  for layer, row, head, p in _attention(artifact, "q_test"):
    length = p.shape[0]
    centres = artifact["meta"]["heavy_hitters"][layer][row][head]
    assert centres, "every head attends to at least one heavy hitter"
    assert min(centres) > z and max(centres) < 3 * length // 4  # long-range, not in the recent window
    background = np.ones(length, bool)  # tokens with no structure: not a sink, heavy span or within 128
    background[:z] = background[-128:] = False
    for c in centres:
      background[max(c - 2, 0):c + 3] = False
    for name, idx in (("sink", slice(0, z)), ("heavy", centres), ("recent", slice(length - 16, length))):
      vs_uniform[name].append(p[idx].mean() * length)
      vs_background[name].append(p[idx].mean() / p[background].mean())
  # Every head shows all three structures against its unstructured tokens...
  for name, ratios in vs_background.items():
    assert min(ratios) > 4, (name, ratios)
  # ... and on average sinks and heavy hitters get several times the average token's attention (1 / length).
  assert np.mean(vs_uniform["sink"]) > 5 and np.mean(vs_uniform["heavy"]) > 2, vs_uniform


def test_observation_window_finds_the_heavy_hitters(artifact):
  # SnapKV's premise: the tokens the last W prompt queries attend to are those later queries attend to.
  found, total = 0, 0
  for layer, row, head, p in _attention(artifact, "q_obs"):
    heavy = artifact["meta"]["heavy_hitters"][layer][row][head]
    top = set(np.argsort(p)[::-1][:p.shape[0] // 4].tolist())
    found += sum(c in top for c in heavy)
    total += len(heavy)
  assert found / total > 0.75  # 0.25 by chance


def test_heads_differ_in_concentration():
  # AdaKV needs heads of one layer with different attention concentration: compare perplexities exp(entropy).
  # Eight kv heads so the spread is a property of the generator, not of two draws.
  wide = synthetic.generate(synthetic.SyntheticConfig(seq_len=256, layers=2, kv_heads=8, q_heads=8, head_dim=64,
                                                      seed=TINY.seed))
  per_layer = {}
  for layer, row, head, p in _attention(wide, "q_test"):
    per_layer.setdefault((layer, row), []).append(np.exp(-np.sum(p * np.log(p + 1e-30))))
  spreads = [max(x) / min(x) for x in per_layer.values()]
  assert min(spreads) > 1.8, spreads


def test_outlier_key_channels_are_large(artifact):
  k = np.abs(artifact["k"][:, 0, :, :int(artifact["lengths"][0])]).mean(axis=2)  # [L, K, H]
  for layer, heads in enumerate(artifact["meta"]["outlier_channels"]):
    for head, channels in enumerate(heads):
      median = np.median(k[layer, head])
      assert np.all(k[layer, head, channels] > 3 * median), (layer, head, channels)


def test_gqa_query_head_n_reads_kv_head_n_over_g(artifact):
  # Every query head lifts the sinks of kv head n // G well above that head's average key (the difference
  # cancels the outlier channels' constant offset), and above what it gives other kv heads' sinks on average.
  l, b, kh, _, h = artifact["k"].shape
  n, g = artifact["q_test"].shape[2], artifact["q_test"].shape[2] // kh
  assert n == TINY.q_heads == g * kh and g > 1
  z = artifact["meta"]["n_sink"]
  own, other = [], []
  for layer in range(l):
    for head in range(n):
      for kv_head in range(kh):
        logits = artifact["q_test"][layer, 0, head] @ artifact["k"][layer, 0, kv_head].T / np.sqrt(h)  # [T, S]
        margin = logits[:, :z].mean() - logits.mean()
        (own if kv_head == head // g else other).append(margin)
  assert min(own) > 1.5 and np.mean(own) > np.mean(other) + 2, (own, other)


@pytest.mark.parametrize("name, dtype", [("a.npz", "float32"), ("ckpt", "float32"), ("ckpt_bf16", "bfloat16")])
def test_save_load_round_trip(artifact, tmp_path, name, dtype):
  path = tmp_path / name
  synthetic.save_artifact(path, artifact, dtype=dtype)
  loaded = synthetic.load_artifact(path)
  assert loaded["meta"] == json.loads(json.dumps(artifact["meta"]))
  for key in synthetic.ARRAY_KEYS:
    want = artifact[key] if dtype == "float32" or key == "lengths" else _bf16_round_trip(artifact[key])
    assert str(loaded[key].dtype) == (str(want.dtype) if dtype == "float32" or key == "lengths" else "bfloat16")
    np.testing.assert_array_equal(np.asarray(loaded[key], want.dtype), want)


def test_save_errors(artifact, tmp_path):
  with pytest.raises(ValueError, match="cannot hold bfloat16"):
    synthetic.save_artifact(tmp_path / "a.npz", artifact, dtype="bfloat16")
  with pytest.raises(ValueError, match=r"missing \['q_test'\]"):
    synthetic.save_artifact(tmp_path / "a.npz", {k: v for k, v in artifact.items() if k != "q_test"})
  with pytest.raises(FileNotFoundError, match="no artifact at"):
    synthetic.load_artifact(tmp_path / "missing.npz")


def test_synthetic_config_errors():
  with pytest.raises(ValueError, match="q_heads=6 must be a multiple of kv_heads=4"):
    synthetic.SyntheticConfig(q_heads=6, kv_heads=4)
  with pytest.raises(ValueError, match="head_dim=8 is too small"):
    synthetic.SyntheticConfig(head_dim=8)
  with pytest.raises(ValueError, match=r"unknown config field artifact\.seq_lenn"):
    synthetic.config_from_dict({"seq_lenn": 4})
  with pytest.raises(ValueError, match=r"artifact\.seq_len must be an integer, got 'big'"):
    synthetic.config_from_dict({"seq_len": "big"})


def test_synthetic_cli(tmp_path, capsys):
  out = tmp_path / "cli.npz"
  synthetic.main(["--out", str(out), "--seq_len", "256", "--layers", "1", "--kv_heads", "2", "--q_heads", "4",
                  "--head_dim", "32", "--seed", "5"])
  loaded = synthetic.load_artifact(out)
  assert loaded["k"].shape == (1, 1, 2, 256, 32) and loaded["meta"]["config"]["seed"] == 5
  assert "wrote" in capsys.readouterr().out


# Quality benchmark.


def test_quality_benchmark_end_to_end(npz_path, tmp_path, capsys):
  out = tmp_path / "results.json"
  run_quality_benchmarks.main([str(npz_path), "--policies", "full,snapkv,kivi2", "--out", str(out),
                               "--no_progress"])
  printed = capsys.readouterr().out
  for name in ("full", "snapkv", "kivi2"):
    assert f"\n{name} " in printed
  results = json.loads(out.read_text())
  assert set(results) == {"artifact", "machine", "policies", "command"}
  assert results["command"].startswith("python experiments/synthetic/run_quality_benchmarks.py ")
  assert results["artifact"]["meta"]["config"]["seed"] == TINY.seed
  assert {"processor", "machine", "device_kind", "jax"} <= set(results["machine"])
  assert list(results["policies"]) == ["full", "snapkv", "kivi2"]
  for name, entry in results["policies"].items():
    assert {"name", "policy", "bytes", "dense_bf16_bytes", "compression_ratio", "mean", "layers", "seconds"} <= set(
        entry)
    assert set(entry["mean"]) == set(run_quality_benchmarks.MEAN_KEYS)
    assert [x["layer"] for x in entry["layers"]] == list(range(TINY.layers))
    for x in entry["layers"]:
      assert set(run_quality_benchmarks.LAYER_KEYS) <= set(x)
    assert entry["compression_ratio"] == pytest.approx(entry["dense_bf16_bytes"] / entry["bytes"])
  full = results["policies"]["full"]
  # Full keeps every bf16 token; only the i32 positions (and empty recent slots) cost extra: ~2% at H = 64.
  assert 0.95 < full["compression_ratio"] <= 1.0
  for x in full["layers"]:
    assert x["output_rel_error"] < 1e-2
    assert x["attention_retained"] == pytest.approx(1.0, abs=1e-5)
    assert x["key_rel_error"] == x["value_rel_error"] == 0.0
  for name in ("snapkv", "kivi2"):
    assert results["policies"][name]["compression_ratio"] > 1.5
  assert results["policies"]["snapkv"]["mean"]["attention_retained"] < 1.0
  assert results["policies"]["kivi2"]["mean"]["key_rel_error"] > 0.0


def test_quality_benchmark_errors(artifact):
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    run_quality_benchmarks.run(artifact, "full,nope", show_progress=False)
  with pytest.raises(ValueError, match=r"policy names must be unique, got \['full'\]"):
    run_quality_benchmarks.run(artifact, "full,full", show_progress=False)
  short = {**artifact, "q_obs": artifact["q_obs"][:, :, :, -8:]}
  with pytest.raises(ValueError, match=r"policy 'snapkv' scores with window=32 .* holds W=8"):
    run_quality_benchmarks.run(short, ["full", "snapkv"], show_progress=False)
  # hybrid_8x keeps 4 sinks + a 128-token recent window: S = 128 cannot hold them at its fixed keep fraction,
  # nor reach its 8x target.
  small = synthetic.generate(dataclasses.replace(TINY, seq_len=128, min_length_frac=1.0, layers=1))
  with pytest.raises(ValueError, match=r"policy 'hybrid_8x' does not fit the artifact \(S=128.*recent=128"):
    run_quality_benchmarks.run(small, ["full", akv.presets.fixed("hybrid_8x")], show_progress=False)
  with pytest.raises(ValueError, match=r"policy 'hybrid_8x' does not fit the artifact \(S=512, 2 layers\): .*"
                                       r"reaches at most [0-9.]+x .* short of the target 8x"):
    run_quality_benchmarks.run(artifact, ["full", "hybrid_8x"], show_progress=False)
  with pytest.raises(ValueError, match=r"policy 'expected_attention' .* needs a model \(its rotary frequencies"):
    run_quality_benchmarks.run(artifact, ["expected_attention"], show_progress=False)
  with pytest.raises(ValueError, match=r"policy 'kvzip' .* needs a model \(its rotary frequencies or a model pass"):
    run_quality_benchmarks.run(artifact, ["kvzip"], show_progress=False)
  with pytest.raises(ValueError, match=r"policy 'adaptive' splits its budget across layers \(budget='adaptive'\), "
                                       r"but this runner measures one layer at a time"):
    run_quality_benchmarks.run(artifact, ["adaptive"], show_progress=False)


def test_quality_benchmark_cli_error(npz_path):
  with pytest.raises(SystemExit, match="unknown preset 'nope'"):
    run_quality_benchmarks.main([str(npz_path), "--policies", "nope", "--no_progress"])


# Config-driven runs.


def test_shipped_config_tiny_run(tmp_path):
  # The exact command of the config's header, through a subprocess: also checks the script's import bootstrap.
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "experiments/synthetic/run_proxy_experiment.py", "--config",
                         "experiments/synthetic/proxy_hybrid_8x.yaml", "--tiny", "--out", str(out), "--no_progress"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "hybrid_8x" in proc.stdout and "full" in proc.stdout
  results = json.loads((out / "results.json").read_text())
  assert results["command"].startswith("python experiments/synthetic/run_proxy_experiment.py --config ")
  assert list(results["policies"]) == ["full", "hybrid_8x"]
  assert results["config"]["policy"] == "hybrid_8x" and results["config"]["artifact"]["seq_len"] == 512
  assert results["policies"]["hybrid_8x"]["compression_ratio"] > 1.5
  assert results["policies"]["full"]["mean"]["output_rel_error"] < 1e-2
  report = (out / "report.md").read_text()
  assert "| hybrid_8x |" in report and "| full |" in report


@pytest.mark.parametrize("script", ["synthetic", "make_artifacts", "run_quality_benchmarks", "run_proxy_experiment"])
@pytest.mark.parametrize("as_module", [False, True])
def test_scripts_start_as_scripts_and_as_modules(script, as_module):
  # Each finds the repo root from experiments/synthetic/ (the bootstrap climbs two folders) or runs under -m.
  target = ["-m", f"experiments.synthetic.{script}"] if as_module else [f"experiments/synthetic/{script}.py"]
  proc = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_shipped_config_header_names_its_command():
  path = REPO / "experiments" / "synthetic" / "proxy_hybrid_8x.yaml"
  text = path.read_text()
  command = "python experiments/synthetic/run_proxy_experiment.py --config experiments/synthetic/proxy_hybrid_8x.yaml"
  assert command in text
  cfg = proxy.load_config(str(path))
  assert cfg.policy == "hybrid_8x" and cfg.baseline == "full" and cfg.artifact.seq_len == 8192
  # Its own folder, not the main job's (`make run` writes out/hybrid_8x).
  assert cfg.out == "out/synthetic_hybrid_8x"


def _write(tmp_path, raw) -> str:
  path = tmp_path / "c.yaml"
  path.write_text(yaml.safe_dump(raw))
  return str(path)


def test_config_overrides(tmp_path):
  path = _write(tmp_path, {"policy": "kivi2", "artifact": {"seq_len": 2048, "layers": 3}, "out": "out/x"})
  cfg = proxy.load_config(path, sets=("artifact.seq_len=1024", "baseline=kivi4"))
  assert (cfg.artifact.seq_len, cfg.artifact.layers, cfg.baseline, cfg.out) == (1024, 3, "kivi4", "out/x")
  tiny = proxy.load_config(path, tiny=True, sets=("artifact.seed=9",))
  assert (tiny.artifact.seq_len, tiny.artifact.seed, tiny.out) == (512, 9, "out/x-tiny")
  default = proxy.load_config(_write(tmp_path, {"policy": "snapkv"}))
  assert default.baseline == "full" and default.out == "out/synthetic_snapkv"
  assert default.artifact == synthetic.SyntheticConfig()


@pytest.mark.parametrize("raw, sets, match", [
    ({"policy": "kivi2", "polcy": "x"}, (), "unknown config field 'polcy'"),
    ({"policy": "kivi2", "artifact": {"seq_lenn": 8}}, (), r"unknown config field artifact\.seq_lenn"),
    ({"policy": "hybrid_9x"}, (), "config field policy: unknown preset 'hybrid_9x'"),
    ({"policy": "kivi2", "baseline": "nope"}, (), "config field baseline: unknown preset 'nope'"),
    ({"artifact": {}}, (), "needs a 'policy' field"),
    ({"policy": "kivi2", "artifact": {}, "artifact_path": "a.npz"}, (), "both artifact and artifact_path='a.npz'"),
    ({"policy": "kivi2"}, ("artifact.seq_len",), r"--set 'artifact\.seq_len' must look like key=value"),
    ({"policy": "kivi2"}, ("artifact.layers=many",), r"artifact\.layers must be an integer, got 'many'"),
    ({"policy": "kivi2"}, ("policy.x=1",), "policy is 'kivi2', not a mapping"),
    ({"policy": "kivi2", "artifact": {"q_heads": 6}}, (), "q_heads=6 must be a multiple of kv_heads=4"),
])
def test_bad_config_errors(tmp_path, raw, sets, match):
  with pytest.raises(ValueError, match=match):
    proxy.load_config(_write(tmp_path, raw), sets=sets)


def test_tiny_refuses_a_loaded_artifact(tmp_path):
  with pytest.raises(ValueError, match="--tiny shrinks the generated artifact"):
    proxy.load_config(_write(tmp_path, {"policy": "kivi2", "artifact_path": "a.npz"}), tiny=True)


def test_bad_config_exits_with_message(tmp_path):
  with pytest.raises(SystemExit, match="error: unknown config field 'polcy'"):
    proxy.main(["--config", _write(tmp_path, {"policy": "kivi2", "polcy": 1})])
