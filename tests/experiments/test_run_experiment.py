"""The model-based main job (run_experiment.py) and the all-policy sweep, end to end at smoke size (--tiny)."""

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments import run_experiment, sweep  # noqa: E402

CONFIGS = ["baseline_full", "hybrid_5x", "hybrid_8x", "hybrid_12x", "streaming", "snapkv", "pyramidkv", "adakv",
           "h2o", "kivi2", "kivi4"]


def test_main_job_tiny_end_to_end(tmp_path):
  # The config header's smoke command, through a subprocess (also checks the script's import bootstrap).
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "experiments/run_experiment.py", "--config", "experiments/hybrid_8x.yaml",
                         "--tiny", "--out", str(out), "--no_progress"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["policy"] == "hybrid_8x" and results["config"]["lengths"] == [256]
  for key in ("baseline", "policy"):
    entry = results[key]
    acc = entry["accuracy"]["256"]
    assert set(acc) == {*run_experiment.tasks.TASK_NAMES, "average"} and 0 <= acc["average"] <= 1
    assert entry["bytes_held"] > 0 and [r["batch"] for r in entry["speed"]] == [1, 2]
    assert all(r["ttft_ms"] > 0 and r["tpot_ms"] > 0 for r in entry["speed"])
  # The policy holds fewer bytes than the full cache on the same prompts, and the ratio says so.
  assert results["policy"]["bytes_held"] < results["baseline"]["bytes_held"]
  assert results["policy"]["compression_ratio"] > results["baseline"]["compression_ratio"]
  for name in ("report.md", "accuracy.png", "speed.png"):
    assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_resolves_and_names_its_command(name):
  path = REPO / "experiments" / f"{name}.yaml"
  assert f"python experiments/run_experiment.py --config experiments/{name}.yaml" in path.read_text()
  cfg = run_experiment.load_config(str(path))
  assert cfg.lengths == (2048,) and cfg.model == "default" and cfg.out == f"out/{name}"


def test_config_errors(tmp_path):
  def write(raw):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)
  with pytest.raises(ValueError, match=r"unknown config field\(s\) \['polcy'\]"):
    run_experiment.load_config(write({"policy": "kivi2", "polcy": 1}))
  with pytest.raises(ValueError, match="needs a 'policy' field"):
    run_experiment.load_config(write({"baseline": "full"}))
  with pytest.raises(ValueError, match="config field policy: unknown preset 'kivi3'"):
    run_experiment.load_config(write({"policy": "kivi3"}))
  with pytest.raises(ValueError, match="config field dtype='float16' must be"):
    run_experiment.load_config(write({"policy": "kivi2", "dtype": "float16"}))
  with pytest.raises(ValueError, match=r"config field lengths=\[0\] must be a non-empty list"):
    run_experiment.load_config(write({"policy": "kivi2", "lengths": [0]}))
  with pytest.raises(ValueError, match="config field samples=0 must be an int >= 1"):
    run_experiment.load_config(write({"policy": "kivi2", "samples": 0}))
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    run_experiment.load_config(write({"policy": "kivi2", "tasks": ["nope"]}))
  cfg = run_experiment.load_config(write({"policy": "kivi2", "lengths": [4096]}))
  with pytest.raises(ValueError, match="the model has max_seq_len=2112"):
    run_experiment.load_model(cfg, None)
  with pytest.raises(ValueError, match="has no config.json"):
    run_experiment.load_model(cfg, str(tmp_path))
  with pytest.raises(SystemExit, match="error: unknown config field"):
    run_experiment.main(["--config", write({"policy": "kivi2", "polcy": 1})])


def test_sweep_tiny(tmp_path):
  out = tmp_path / "sweep"
  results = sweep.main(["--tiny", "--out", str(out), "--policies", "full,kivi2", "--no_progress"])
  assert list(results["policies"]) == ["full", "kivi2"] and results["policies"]["full"]["retained"] == 1.0
  saved = json.loads((out / "results.json").read_text())
  assert saved["policies"]["kivi2"]["compression_ratio"] > saved["policies"]["full"]["compression_ratio"]
  for name in ("report.md", "accuracy_vs_ratio.png", "memory_vs_ratio.png", "speed_vs_batch.png"):
    assert (out / name).stat().st_size > 0
  with pytest.raises(SystemExit, match="unknown preset 'nope'"):
    sweep.main(["--tiny", "--out", str(out), "--policies", "full,nope"])


def test_hugging_face_checkpoint_reads_the_tasks_as_text(tmp_path):
  """--model_path: a tiny HF checkpoint (random weights) whose tokenizer knows the task names; the plumbing runs
  and the text round trip is exact (the scores of a random model mean nothing)."""
  import jax  # noqa: PLC0415
  import tokenizers  # noqa: PLC0415

  from akv_jax import models, tasks  # noqa: PLC0415
  from experiments import model_eval  # noqa: PLC0415
  vocab = tasks.Vocab()
  names = vocab.decode(range(vocab.size))
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({n: i for i, n in enumerate(names)}, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.decoder = tokenizers.decoders.WordPiece(prefix="##", cleanup=False)   # joins words with spaces
  ckpt = tmp_path / "ckpt"
  config = models.LlamaConfig(vocab_size=vocab.size, hidden_size=128, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, max_seq_len=512)
  models.save_checkpoint(ckpt, config, models.init_params(config, jax.random.key(0)))
  tok.save(str(ckpt / "tokenizer.json"))
  text = model_eval.TextTasks(models.load_tokenizer(ckpt), (tasks.vocab.EOS,))
  batch = tasks.make_batch("niah_single", __import__("numpy").random.default_rng(0), 64, vocab, 2)
  toks, lens = text.encode(batch)
  assert list(lens) == [63, 63] and toks.shape == (2, 64)
  answer = batch.samples[0].answer
  assert list(text.decode(__import__("numpy").asarray(answer))) == list(answer)   # "v3 v9 <eos>" round trip
  cfg = run_experiment.load_config(str(REPO / "experiments" / "kivi2.yaml"), tiny=True,
                                   sets=(f"out={tmp_path / 'out'}", "tasks=[niah_single,common_words]"))
  results = run_experiment.run(cfg, model_path=str(ckpt), progress=False)
  assert results["model"]["source"] == str(ckpt)
  assert set(results["policy"]["accuracy"]["256"]) == {"niah_single", "common_words", "average"}
  assert results["policy"]["bytes_held"] < results["baseline"]["bytes_held"]


def test_ablation_tiny(tmp_path):
  from experiments import ablate_hybrid  # noqa: PLC0415
  out = tmp_path / "ablation"
  results = ablate_hybrid.main(["--tiny", "--out", str(out), "--targets", "3", "--no_progress",
                                "--set", "tasks=[niah_single,common_words]"])
  rows = {(r["target"], r["variant"]): r for r in results["rows"]}
  assert {v for _, v in rows} == {"selection", "hybrid", "quantize"}
  for r in results["rows"]:
    if r["policy"] is not None:   # matched bytes: each variant within a few percent of its target
      assert abs(r["ratio"] - r["target"]) / r["target"] < 0.1, r
  assert (out / "report.md").read_text().startswith("# Selection x quantization at matched bytes")
