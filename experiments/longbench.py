"""LongBench-format evaluation of compression policies on a Hugging Face Llama checkpoint with its tokenizer.

    python experiments/longbench.py --data_dir DIR --model_path CKPT --config experiments/longbench_8x.yaml
        [--out OUT] [--set key=value ...]

Reads DIR/<dataset>.jsonl files in LongBench's format (one JSON object per line with context, input, answers,
all_classes, length, dataset), builds each dataset's prompt from its template, truncates over-long prompts in the
middle (keeping the start and the end, where instructions and questions sit), generates greedily with each policy
on the same prompts, and scores with the dataset's metric. Nothing is downloaded: the data and the checkpoint are
the user's. Writes OUT/results.json (per dataset and policy: score, samples, bytes held) and OUT/report.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import json
import pathlib
import re
import string
import sys
from typing import Callable

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import akv_jax as akv
from akv_jax import models
from experiments import config_files, result_files

# ------------------------------------------------------------------------------------------------ metrics


def normalize(text: str) -> str:
  """Lower case, no punctuation, no articles, single spaces (the usual SQuAD-style answer normalization)."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in set(string.punctuation))
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def qa_f1(prediction: str, answer: str, **_) -> float:
  """Token-level F1 between normalized prediction and answer."""
  pred, gold = normalize(prediction).split(), normalize(answer).split()
  common = collections.Counter(pred) & collections.Counter(gold)
  same = sum(common.values())
  if not pred or not gold or same == 0:
    return 0.0
  p, r = same / len(pred), same / len(gold)
  return 2 * p * r / (p + r)


def rouge_l(prediction: str, answer: str, **_) -> float:
  """ROUGE-L F-measure on whitespace tokens (longest common subsequence)."""
  a, b = prediction.lower().split(), answer.lower().split()
  if not a or not b:
    return 0.0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  lcs = prev[-1]
  if lcs == 0:
    return 0.0
  p, r = lcs / len(a), lcs / len(b)
  return 2 * p * r / (p + r)


def classification(prediction: str, answer: str, all_classes=(), **_) -> float:
  """1 / (number of class names the prediction mentions) if the right one is among them, else 0."""
  named = [c for c in all_classes if c in prediction]
  # A class name inside a longer named class (e.g. "location" in "location city") does not count on its own.
  named = [c for c in named if not any(c != o and c in o for o in named)]
  return 1.0 / len(named) if answer in named else 0.0


def retrieval(prediction: str, answer: str, **_) -> float:
  """The fraction of numbers in the prediction that equal the answer's paragraph number."""
  target = re.findall(r"\d+", answer)
  found = re.findall(r"\d+", prediction)
  if not target or not found:
    return 0.0
  return sum(f == target[0] for f in found) / len(found)


def count(prediction: str, answer: str, **_) -> float:
  found = re.findall(r"\d+", prediction)
  return sum(f == str(answer) for f in found) / len(found) if found else 0.0


def code_similarity(prediction: str, answer: str, **_) -> float:
  """Edit similarity (difflib ratio) between the answer and the first non-comment line of the prediction."""
  lines = [ln for ln in prediction.lstrip("\n").split("\n") if ln.strip() and not ln.strip().startswith(("#", "//"))]
  first = lines[0] if lines else ""
  return difflib.SequenceMatcher(None, first, answer).ratio()


# ------------------------------------------------------------------------------------------------ datasets


@dataclasses.dataclass(frozen=True)
class Dataset:
  """How one LongBench dataset is prompted and scored."""

  template: str          # formatted with {context} and {input}
  metric: Callable
  max_new_tokens: int


_QA = ("Read the text and answer the question as briefly as you can.\n\n{context}\n\n"
       "Question: {input}\nAnswer:")
_SUM = "Summarize the following text.\n\n{context}\n\n{input}\nSummary:"
DATASETS: dict[str, Dataset] = {
    **{name: Dataset(_QA, qa_f1, 32) for name in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa",
                                                  "2wikimqa", "musique", "triviaqa")},
    **{name: Dataset(_SUM, rouge_l, 256) for name in ("gov_report", "qmsum", "multi_news", "samsum")},
    "trec": Dataset("Classify the question into one of the types shown in the examples.\n\n{context}\n{input}",
                    classification, 16),
    "passage_retrieval_en": Dataset("Here are numbered paragraphs and a summary. Which paragraph does the summary "
                                    "describe? Answer like \"Paragraph 3\".\n\n{context}\n\nSummary: {input}\n"
                                    "Answer:", retrieval, 16),
    "passage_count": Dataset("How many different paragraphs are there among the paragraphs below (some repeat)? "
                             "Answer with a number.\n\n{context}\n\nAnswer:", count, 16),
    "lcc": Dataset("Complete the next line of code.\n\n{context}", code_similarity, 64),
    "repobench-p": Dataset("Complete the next line of code.\n\n{context}{input}", code_similarity, 64),
}


def read_jsonl(path: pathlib.Path) -> list[dict]:
  rows = []
  for i, line in enumerate(path.read_text().splitlines()):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{i + 1} is not JSON: {e}") from None
    missing = [k for k in ("context", "input", "answers") if k not in row]
    if missing:
      raise ValueError(f"{path}:{i + 1} lacks field(s) {missing}")
    rows.append(row)
  return rows


def score(dataset: str, prediction: str, row: dict) -> float:
  """The dataset's metric against the best of its reference answers."""
  spec = DATASETS[dataset]
  return max(spec.metric(prediction, str(a), all_classes=row.get("all_classes") or ()) for a in row["answers"])


def encode(tokenizer, text: str, max_tokens: int) -> list[int]:
  """Token ids of text, the middle cut out when longer than max_tokens (LongBench's truncation)."""
  ids = tokenizer.encode(text).ids
  if len(ids) > max_tokens:
    half = max_tokens // 2
    ids = ids[:half] + ids[len(ids) - (max_tokens - half):]
  return ids


# ------------------------------------------------------------------------------------------------ runner


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongBenchConfig:
  policies: tuple[str, ...] = ("full", "hybrid_8x")
  datasets: tuple[str, ...] = ("narrativeqa", "qasper", "hotpotqa", "gov_report", "trec", "passage_retrieval_en",
                               "lcc")
  max_length: int = 8192        # prompt tokens after truncation
  samples: int = 0              # per dataset; 0 = all
  dtype: str = "bfloat16"
  out: str = "out/longbench_8x"

  def __post_init__(self):
    for name in self.policies:
      akv.presets.get(name)
    unknown = [d for d in self.datasets if d not in DATASETS]
    if unknown:
      raise ValueError(f"unknown LongBench dataset(s) {unknown}; known: {sorted(DATASETS)}")
    if self.max_length < 16:
      raise ValueError(f"max_length={self.max_length} must be >= 16")


def load_config(path: str | None, sets: tuple[str, ...]) -> LongBenchConfig:
  return config_files.load(path, LongBenchConfig, sets=sets)


def run(cfg: LongBenchConfig, data_dir: str, model_path: str, *, progress: bool = True) -> dict:
  data = pathlib.Path(data_dir)
  files = {d: data / f"{d}.jsonl" for d in cfg.datasets}
  missing = [str(p) for p in files.values() if not p.is_file()]
  if missing:
    raise ValueError(f"missing LongBench file(s): {missing}")
  config, params = models.load_checkpoint(model_path, dtype=cfg.dtype, max_seq_len=None)
  tokenizer = models.load_tokenizer(model_path)
  results: dict = {"datasets": {}}
  for dataset, path in files.items():
    rows = read_jsonl(path)
    rows = rows[:cfg.samples] if cfg.samples else rows
    spec = DATASETS[dataset]
    budget = min(cfg.max_length, config.max_seq_len - spec.max_new_tokens)
    if budget < 1:
      raise ValueError(f"model max_seq_len={config.max_seq_len} leaves no room for {dataset}'s prompt")
    prompts = [encode(tokenizer, spec.template.format(context=r["context"], input=r["input"]), budget) for r in rows]
    entry = {}
    for name in cfg.policies:
      policy = akv.presets.get(name)
      scores, held = [], 0
      for row, ids in tqdm(list(zip(rows, prompts)), desc=f"{dataset}/{name}", disable=not progress):
        toks = jnp.asarray([ids], jnp.int32)
        lens = jnp.asarray([len(ids)], jnp.int32)
        eos = tuple(t for t in (tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<|eot_id|>"),
                                tokenizer.token_to_id("<|end_of_text|>")) if t is not None)
        gen, n, _ = models.generate(config, params, toks, lens, policy, spec.max_new_tokens, stop_tokens=eos)
        text = tokenizer.decode([int(t) for t in np.asarray(gen[0, :int(n[0])]) if int(t) not in eos])
        scores.append(score(dataset, text, row))
        held += akv.nbytes(jax.eval_shape(lambda t, m: models.prefill(config, params, t, m, policy)[1], toks, lens))
      entry[name] = dict(score=float(np.mean(scores)) if scores else 0.0, samples=len(scores), bytes_held=held)
    results["datasets"][dataset] = entry
  return results


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--model_path", required=True)
  parser.add_argument("--config", default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    cfg = load_config(args.config, tuple(args.sets) + ((f"out={args.out}",) if args.out else ()))
    results = run(cfg, args.data_dir, args.model_path, progress=not args.no_progress)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  results.update(command=result_files.command_line("longbench.py", argv), config=dataclasses.asdict(cfg),
                 machine=result_files.machine())
  out = pathlib.Path(cfg.out)
  result_files.write_json(out / "results.json", results)
  md = ["| dataset | " + " | ".join(cfg.policies) + " |", "|---|" + "---:|" * len(cfg.policies)]
  for dataset, entry in results["datasets"].items():
    md.append(f"| {dataset} | " + " | ".join(f"{entry[p]['score']:.3f}" for p in cfg.policies) + " |")
  (out / "report.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))
  return results


if __name__ == "__main__":
  main()
