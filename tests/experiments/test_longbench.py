"""The LongBench runner on fixture files the test writes, with a tiny Hugging Face checkpoint and tokenizer the
test also writes (random weights: the scores are not meaningful, the plumbing and the metrics are)."""

import json
import pathlib
import sys

import jax
import pytest
import tokenizers

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from akv_jax import models  # noqa: E402
from experiments import longbench as lb  # noqa: E402

WORDS = ("the a cache is compressed question answer paragraph summary what where who city river paris london "
         "rome type location number 1 2 3 4 5 : . ? \" def return x = + read text briefly as you can and").split()


def test_metrics():
  assert lb.qa_f1("The Paris.", "paris") == 1.0
  assert lb.qa_f1("paris london", "paris") == pytest.approx(2 / 3)
  assert lb.qa_f1("", "paris") == 0.0
  assert lb.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
  assert lb.classification("location city", "location city", all_classes=["location", "location city", "number"]) == 1
  assert lb.classification("number or location", "number", all_classes=["location", "number"]) == 0.5
  assert lb.classification("nothing", "number", all_classes=["location", "number"]) == 0.0
  assert lb.retrieval("Paragraph 3", "Paragraph 3") == 1.0 and lb.retrieval("3 or 4", "Paragraph 3") == 0.5
  assert lb.count("there are 5", 5) == 1.0
  assert lb.code_similarity("# comment\nreturn x + 1\n", "return x + 1") == 1.0
  assert lb.score("hotpotqa", "paris", {"answers": ["rome", "paris"]}) == 1.0


def test_middle_truncation():
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *WORDS])},
                                                         unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  ids = lb.encode(tok, "the a cache is compressed question", 4)
  assert ids == tok.encode("the a compressed question").ids


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("lb")
  vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", *WORDS])}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  ckpt = root / "ckpt"
  config = models.LlamaConfig(vocab_size=len(vocab), hidden_size=128, intermediate_size=128, num_layers=2,
                              num_heads=4, num_kv_heads=2, max_seq_len=512)
  models.save_checkpoint(ckpt, config, models.init_params(config, jax.random.key(0)))
  tok.save(str(ckpt / "tokenizer.json"))
  data = root / "data"
  data.mkdir()
  ctx = " ".join(["the cache is compressed ."] * 40)
  rows = {
      "hotpotqa": [{"context": ctx + " paris is a city .", "input": "what city ?", "answers": ["paris"],
                    "all_classes": None, "length": 205, "dataset": "hotpotqa"}] * 2,
      "trec": [{"context": ctx, "input": "where is rome ?", "answers": ["location"],
                "all_classes": ["location", "number"], "length": 200, "dataset": "trec"}],
      "passage_retrieval_en": [{"context": ctx, "input": "a river", "answers": ["Paragraph 2"],
                                "all_classes": None, "length": 200, "dataset": "passage_retrieval_en"}],
  }
  for name, items in rows.items():
    (data / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in items) + "\n")
  return root, ckpt, data


def test_runner_end_to_end(setup):
  root, ckpt, data = setup
  out = root / "out"
  results = lb.main(["--data_dir", str(data), "--model_path", str(ckpt), "--out", str(out), "--no_progress",
                     "--set", "policies=[full,kivi2]", "--set", "datasets=[hotpotqa,trec,passage_retrieval_en]",
                     "--set", "max_length=180"])
  saved = json.loads((out / "results.json").read_text())
  assert saved["datasets"].keys() == {"hotpotqa", "trec", "passage_retrieval_en"}
  for dataset, entry in results["datasets"].items():
    assert entry["full"]["samples"] == (2 if dataset == "hotpotqa" else 1)
    assert 0.0 <= entry["kivi2"]["score"] <= 1.0
    assert entry["kivi2"]["bytes_held"] < entry["full"]["bytes_held"]
  assert "| hotpotqa |" in (out / "report.md").read_text()


def test_errors(setup, tmp_path):
  root, ckpt, data = setup
  with pytest.raises(SystemExit, match=r"missing LongBench file\(s\)"):
    lb.main(["--data_dir", str(tmp_path), "--model_path", str(ckpt), "--set", "datasets=[hotpotqa]"])
  with pytest.raises(SystemExit, match=r"unknown LongBench dataset\(s\) \['nope'\]"):
    lb.main(["--data_dir", str(data), "--model_path", str(ckpt), "--set", "datasets=[nope]"])
  with pytest.raises(SystemExit, match=r"unknown config field\(s\) \['polices'\]"):
    lb.main(["--data_dir", str(data), "--model_path", str(ckpt), "--set", "polices=[full]"])
  bad = tmp_path / "hotpotqa.jsonl"
  bad.write_text('{"context": "x", "input": "y"}\n')
  with pytest.raises(ValueError, match=r"hotpotqa.jsonl:1 lacks field\(s\) \['answers'\]"):
    lb.read_jsonl(bad)
  bad.write_text("not json\n")
  with pytest.raises(ValueError, match="hotpotqa.jsonl:1 is not JSON"):
    lb.read_jsonl(bad)
