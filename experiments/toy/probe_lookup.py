"""Has a model learned the key lookup? Its first-answer accuracy on recall streams against two key-blind baselines.

    python experiments/toy/probe_lookup.py [--model_path DIR] [--lengths 128 256 1024] [--pairs 16] [--rows 64] \
        --out experiments/results/lookup_probe_default.json

Multi-key and multi-query needles and variable tracking need a lookup: answer from the record whose key matches
the queried one (tasks.recall_stream holds the format). A model without it still answers something plausible, so
its accuracy is compared with what ignoring the key gives: answering from the most recent record ("latest") and
a uniform guess among the records seen so far ("uniform"). Accuracy at the baselines means no lookup was learned.
train_tiny.py logs the same probe at every evaluation.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax.numpy as jnp
import numpy as np

from akv_jax import models, tasks
from experiments.result_files import command_line, report


def lookup_accuracy(config, params, *, length: int, pairs: int = 16, rows: int = 64, seed: int = 0) -> dict:
  """First-answer-token accuracy of a greedy teacher-forced model on `rows` recall streams of `length` tokens.

  Returns {"queries", "accuracy", "latest", "uniform"}: the number of queries scored, the model's accuracy, and
  the two key-blind baselines on the same queries.
  """
  if length > config.max_seq_len:
    raise ValueError(f"length={length} exceeds the model's max_seq_len={config.max_seq_len}")
  rng = np.random.default_rng(seed)
  vocab = tasks.Vocab()
  streams = np.stack([tasks.recall_stream(rng, length, vocab, pairs)[0] for _ in range(rows)])   # [R, L]
  pred = np.asarray(jnp.argmax(models.forward(config, params, jnp.asarray(streams)), axis=-1))    # [R, L]
  hits, latest, uniform = [], [], []
  for r in range(rows):
    q = tasks.recall_queries(streams[r])
    hits.append(pred[r, q["position"]] == q["truth"])
    latest.append(q["latest"] == q["truth"])
    uniform.append(1.0 / q["seen"])
  hits, latest, uniform = (np.concatenate(x) for x in (hits, latest, uniform))
  if hits.size == 0:
    raise ValueError(f"no query fits in {rows} streams of length={length}; use longer streams")
  return {"queries": int(hits.size), "accuracy": round(float(hits.mean()), 4),
          "latest": round(float(latest.mean()), 4), "uniform": round(float(uniform.mean()), 4)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_path", default=None, help="a directory written by train_tiny.py (default: shipped)")
  parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 1024, 2048])
  parser.add_argument("--pairs", type=int, default=16)
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="write the result JSON here")
  args = parser.parse_args(argv)
  config, params = models.load_default(args.model_path)
  result = {"command": command_line("toy/probe_lookup.py", argv),
            "model": args.model_path or "default", "pairs": args.pairs, "rows": args.rows,
            "by_length": {str(n): lookup_accuracy(config, params, length=n, pairs=args.pairs, rows=args.rows,
                                                  seed=args.seed) for n in args.lengths}}
  return report(result, args.out)


if __name__ == "__main__":
  main()
