"""Real KV artifacts for the synthetic-data runner: per-layer K/V and queries from a model's prefill on task prompts.

    python experiments/synthetic/make_artifacts.py --out out/artifacts/tiny_2048 [--model_path DIR] [--length 2048]
        [--tasks niah_single,...] [--batch 7] [--window 32] [--seed 0]
    python experiments/synthetic/run_quality_benchmarks.py out/artifacts/tiny_2048

The artifact has the layout experiments/synthetic/synthetic.py writes (k, v [L, B, K, S, H], q_obs [L, B, N, W, H],
q_test [L, B, N, T, H], lengths i32[B]). q_obs are each row's last W prompt queries; q_test are the queries of
the T answer tokens that follow the prompt (teacher-forced with the expected answer), the queries compression
has to serve. K/V cover the prompt only.
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
from experiments.synthetic import synthetic


def build(config, params, *, length: int, task_names, batch: int, window: int, seed: int) -> dict:
  """Runs the prompts plus their answers through the model and cuts the artifact out of the captured q/k/v."""
  vocab = tasks.Vocab()
  rng = np.random.default_rng(seed)
  b = tasks.make_batch(list(task_names), rng, length, vocab, batch)
  t = int(b.answer_lengths.min())   # every row contributes the same number of test queries
  seqs = np.concatenate([b.prompts, b.answers[:, :t]], axis=1)
  # Rows all have the full prompt length here, so the answer follows the prompt at index `length`.
  qkv = models.capture_qkv(config, params, jnp.asarray(seqs))
  lengths = np.asarray(b.lengths, np.int32)
  k = np.stack([np.asarray(x[1][:, :length]).transpose(0, 2, 1, 3) for x in qkv])       # [L, B, K, S, H]
  v = np.stack([np.asarray(x[2][:, :length]).transpose(0, 2, 1, 3) for x in qkv])
  q = [np.asarray(x[0]).transpose(0, 2, 1, 3) for x in qkv]                              # [B, N, S + T, H]
  q_obs = np.stack([x[:, :, length - window:length] for x in q])
  q_test = np.stack([x[:, :, length:length + t] for x in q])
  meta = {"generator": "experiments/synthetic/make_artifacts.py", "tasks": list(b.tasks), "length": length,
          "window": window, "seed": seed, "model": dict(num_layers=config.num_layers, hidden_size=config.hidden_size)}
  return {"k": k, "v": v, "lengths": lengths, "q_obs": q_obs, "q_test": q_test, "meta": meta}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--model_path", default=None, help="directory from train_tiny.py (default: shipped model)")
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--tasks", default=",".join(tasks.TASK_NAMES))
  parser.add_argument("--batch", type=int, default=7)
  parser.add_argument("--window", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.tasks.split(",") if n.strip()]
  for n in names:
    tasks.get_task(n)
  if args.window > args.length:
    raise SystemExit(f"error: window={args.window} is longer than length={args.length}")
  config, params = models.load_default(args.model_path)
  artifact = build(config, params, length=args.length, task_names=names, batch=args.batch, window=args.window,
                   seed=args.seed)
  synthetic.save_artifact(args.out, artifact, dtype="float32" if args.out.endswith(".npz") else args.dtype)
  print(f"wrote {args.out}: {synthetic.describe(artifact)}")
  return artifact


if __name__ == "__main__":
  main()
