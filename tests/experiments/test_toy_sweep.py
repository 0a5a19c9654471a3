"""The toy model's runner (experiments/toy/sweep.py) and its ablation, end to end at smoke size (--tiny)."""

import json
import pathlib
import subprocess
import sys

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments.toy import sweep  # noqa: E402

# The presets that had a config of their own before the runner took a list: each is one `--set policies=[...]`.
ONE_POLICY = ["full", "hybrid_5x", "hybrid_8x", "hybrid_12x", "streaming", "snapkv", "pyramidkv", "adakv", "h2o",
              "kivi2", "kivi4"]
SCRIPTS = ["sweep", "ablate_hybrid", "train_tiny", "probe_answers", "probe_format", "probe_lookup"]


def test_one_policy_tiny_end_to_end(tmp_path):
  # The config header's one-policy command at smoke size, through a subprocess (also checks the script's import
  # bootstrap): the baseline is evaluated even though the list does not name it.
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "experiments/toy/sweep.py", "--set", "policies=[hybrid_8x]", "--tiny",
                         "--out", str(out), "--no_progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  results = json.loads((out / "results.json").read_text())
  assert results["config"]["policies"] == ["hybrid_8x"] and results["config"]["lengths"] == [256]
  assert results["command"] == f"python experiments/toy/sweep.py --set policies=[hybrid_8x] --tiny --out {out} " \
                               "--no_progress"
  assert list(results["policies"]) == ["full", "hybrid_8x"] and results["baseline"] == "full"
  for entry in results["policies"].values():
    acc = entry["accuracy"]["256"]
    assert set(acc) == {*sweep.tasks.TASK_NAMES, "average"} and 0 <= acc["average"] <= 1
    assert entry["bytes_held"] > 0 and [r["batch"] for r in entry["speed"]] == [1, 2]
    assert all(r["ttft_ms"] > 0 and r["tpot_ms"] > 0 for r in entry["speed"])
  # The policy holds fewer bytes than the full cache on the same prompts, and the ratio says so.
  full, policy = results["policies"]["full"], results["policies"]["hybrid_8x"]
  assert policy["bytes_held"] < full["bytes_held"] and policy["compression_ratio"] > full["compression_ratio"]
  assert full["retained"] == 1.0
  assert results["model"]["source"] == "default" and results["model"]["layers"] == 4
  for name in ("report.md", "accuracy_vs_ratio.png", "memory_vs_ratio.png", "speed_vs_batch.png"):
    assert (out / name).stat().st_size > 0
  assert "| `hybrid_8x` |" in (out / "report.md").read_text()


def test_sweep_tiny(tmp_path):
  out = tmp_path / "sweep"
  results = sweep.main(["--tiny", "--out", str(out), "--set", "policies=[full,kivi2]", "--no_progress"])
  # The baseline, listed, is evaluated once, first.
  assert list(results["policies"]) == ["full", "kivi2"] and results["policies"]["full"]["retained"] == 1.0
  saved = json.loads((out / "results.json").read_text())
  assert saved["policies"]["kivi2"]["compression_ratio"] > saved["policies"]["full"]["compression_ratio"]
  for name in ("report.md", "accuracy_vs_ratio.png", "memory_vs_ratio.png", "speed_vs_batch.png"):
    assert (out / name).stat().st_size > 0
  with pytest.raises(SystemExit, match="unknown preset 'nope'"):
    sweep.main(["--tiny", "--out", str(out), "--set", "policies=[full,nope]"])


def test_the_shipped_config_names_its_commands():
  text = sweep.CONFIG.read_text()
  for command in ("python experiments/toy/sweep.py --out experiments/results/sweep_2048",
                  'python experiments/toy/sweep.py --set "policies=[hybrid_8x]"',
                  'python experiments/toy/sweep.py --tiny --set "policies=[full,hybrid_8x]"'):
    assert command in text
  cfg = sweep.load_config()
  assert cfg.lengths == (2048,) and cfg.model == "default" and cfg.baseline == "full" and cfg.out == "out/toy_sweep"
  assert cfg.policies[0] == "full" and len(cfg.policies) == 13 and len(set(cfg.policies)) == 13
  assert sweep.load_config(tiny=True).out == "out/toy_sweep-tiny"   # a smoke run keeps off the full run's results


@pytest.mark.parametrize("name", ONE_POLICY)
def test_one_policy_resolves(name):
  cfg = sweep.load_config(sets=(f"policies=[{name}]",))
  assert cfg.policies == (name,) and cfg.names() == list(dict.fromkeys(["full", name]))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("as_module", [False, True])
def test_scripts_start_as_scripts_and_as_modules(script, as_module):
  # Each finds the repo root from experiments/toy/ (the bootstrap climbs two folders) or runs under `python -m`.
  target = ["-m", f"experiments.toy.{script}"] if as_module else [f"experiments/toy/{script}.py"]
  proc = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_config_errors(tmp_path):
  def write(raw):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)
  with pytest.raises(ValueError, match=r"unknown config field\(s\) \['polcy'\]"):
    sweep.load_config(write({"policies": ["kivi2"], "polcy": 1}))
  with pytest.raises(ValueError, match="needs a 'policies' field"):
    sweep.load_config(write({"baseline": "full"}))
  with pytest.raises(ValueError, match="config field policies: unknown preset 'kivi5'"):
    sweep.load_config(write({"policies": ["kivi5"]}))
  with pytest.raises(ValueError, match=r"config field policies=\(\) must be a non-empty list"):
    sweep.load_config(write({"policies": []}))
  with pytest.raises(ValueError, match="config field policies='kivi2' must be a non-empty list"):
    sweep.load_config(write({"policies": "kivi2"}))
  with pytest.raises(ValueError, match=r"config field policies names \['kivi2'\] more than once"):
    sweep.load_config(write({"policies": ["kivi2", "full", "kivi2"]}))
  with pytest.raises(ValueError, match="config field baseline: unknown preset 'nope'"):
    sweep.load_config(write({"policies": ["kivi2"], "baseline": "nope"}))
  with pytest.raises(ValueError, match="config field dtype='float16' must be"):
    sweep.load_config(write({"policies": ["kivi2"], "dtype": "float16"}))
  with pytest.raises(ValueError, match=r"config field lengths=\[0\] must be a non-empty list"):
    sweep.load_config(write({"policies": ["kivi2"], "lengths": [0]}))
  with pytest.raises(ValueError, match="config field samples=0 must be an int >= 1"):
    sweep.load_config(write({"policies": ["kivi2"], "samples": 0}))
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    sweep.load_config(write({"policies": ["kivi2"], "tasks": ["nope"]}))
  with pytest.raises(ValueError, match=r"--set 'samples' must look like key=value"):
    sweep.load_config(write({"policies": ["kivi2"]}), sets=("samples",))
  cfg = sweep.load_config(write({"policies": ["kivi2"], "lengths": [4096]}))
  with pytest.raises(ValueError, match="the model has max_seq_len=2112"):
    sweep.load_model(cfg, None)
  with pytest.raises(ValueError, match="has no config.json"):
    sweep.load_model(cfg, str(tmp_path))
  with pytest.raises(SystemExit, match="error: unknown config field"):
    sweep.main(["--config", write({"policies": ["kivi2"], "polcy": 1})])
  with pytest.raises(SystemExit, match="error: .*No such file"):
    sweep.main(["--config", str(tmp_path / "missing.yaml")])


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
  cfg = sweep.load_config(tiny=True, sets=(f"out={tmp_path / 'out'}", "tasks=[niah_single,common_words]",
                                           "policies=[kivi2]"))
  results = sweep.run(cfg, model_path=str(ckpt), progress=False)
  assert results["model"]["source"] == str(ckpt) and results["model"]["layers"] == 2
  assert set(results["policies"]["kivi2"]["accuracy"]["256"]) == {"niah_single", "common_words", "average"}
  assert results["policies"]["kivi2"]["bytes_held"] < results["policies"]["full"]["bytes_held"]


def test_ablation_tiny(tmp_path):
  from experiments.toy import ablate_hybrid  # noqa: PLC0415
  out = tmp_path / "ablation"
  results = ablate_hybrid.main(["--tiny", "--out", str(out), "--targets", "3", "--no_progress",
                                "--set", "tasks=[niah_single,common_words]"])
  assert results["command"].startswith("python experiments/toy/ablate_hybrid.py --tiny")
  rows = {(r["target"], r["variant"]): r for r in results["rows"]}
  assert {v for _, v in rows} == {"selection", "hybrid", "quantize"}
  for r in results["rows"]:
    if r["policy"] is not None:   # matched bytes: each variant within a few percent of its target
      assert abs(r["ratio"] - r["target"]) / r["target"] < 0.1, r
  assert (out / "report.md").read_text().startswith("# Selection x quantization at matched bytes")
