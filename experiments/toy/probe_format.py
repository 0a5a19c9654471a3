"""Which record format lets a small decoder learn the key lookup? The same toy model trained on recall streams in
three formats, with the lookup probed as it trains.

    python experiments/toy/probe_format.py --out experiments/results/probe_format.json      (CPU, about 14 minutes)
    python experiments/toy/probe_format.py --tiny --out /tmp/probe_format.json               (seconds)

Formats (records, then queries; the loss is on the answer ids and EOS):

  marker   KEY k VALUE v..   QUERY k ANSWER v.. EOS    the task format before 2026-11-27
  answer   KEY k v..         QUERY k ANSWER v.. EOS    a marker between query and answer only
  plain    KEY k v..         QUERY k v.. EOS           today's format (akv_jax.tasks.recall_stream)

Each format trains the same model from the same initialization on the same schedule (train_tiny's loss,
optimizer and learning-rate schedule, held at its peak after warmup unless --min_lr_frac anneals it: a format is
judged by whether it learns the lookup, not by how much it learns before the rate decays), and every
`--probe_every` steps the first-answer accuracy on held-out streams is compared with answering from the most
recent record, which needs no lookup. The shipped model uses
the plain format; akv_jax/tasks/vocab.py says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from akv_jax import models, tasks
from akv_jax.tasks.vocab import BOS, EOS, KEY, QUERY
from experiments.result_files import command_line, machine, write_json
from experiments.toy import train_tiny

# The retired VALUE and ANSWER markers get two ids past the task vocabulary (the toy model's table has room).
_VALUE, _ANSWER = tasks.Vocab().size, tasks.Vocab().size + 1
FORMATS = {"marker": ([_VALUE], [_ANSWER]), "answer": ([], [_ANSWER]), "plain": ([], [])}


def stream(rng: np.random.Generator, fmt: str, length: int, vocab: tasks.Vocab, pairs: int):
  """One recall stream in format `fmt` (tasks.recall_stream's draws and rates) -> tokens i32[L], mask bool[L],
  and the probe's (position, truth, latest) triples: where the first answer id is predicted, that id, and the
  first value of the most recent record."""
  mid, before_answer = FORMATS[fmt]
  keys = rng.choice(np.asarray(vocab.key_ids), pairs, replace=False)
  vals = [rng.choice(np.asarray(vocab.value_ids), int(rng.integers(1, 4)), replace=False) for _ in range(pairs)]
  words = np.asarray(vocab.word_ids)
  toks, mask, probes, seen = [BOS], [False], [], 0
  while len(toks) < length:
    r = rng.random()
    if r < 0.12 and seen < pairs:
      rec = [KEY, int(keys[seen]), *mid, *map(int, vals[seen])]
      toks, mask, seen = toks + rec, mask + [False] * len(rec), seen + 1
    elif r < 0.3 and seen:
      i = int(rng.integers(seen))
      head = [QUERY, int(keys[i]), *before_answer]
      probes.append((len(toks) + len(head) - 1, int(vals[i][0]), int(vals[seen - 1][0])))
      ans = [*map(int, vals[i]), EOS]
      toks, mask = toks + head + ans, mask + [False] * len(head) + [True] * len(ans)
    else:
      toks, mask = toks + [int(rng.choice(words))], mask + [False]
  probes = [p for p in probes if p[0] + 1 < length]
  return np.asarray(toks[:length], np.int32), np.asarray(mask[:length], bool), probes


def run_format(fmt: str, cfg: train_tiny.TrainConfig, args) -> dict:
  vocab = tasks.Vocab()
  config = dataclasses.replace(cfg.model_config(), vocab_size=vocab.size + 2)
  params = models.init_params(config, jax.random.key(args.seed))
  optimizer = train_tiny.make_optimizer(cfg)
  opt_state = optimizer.init(params)
  step_fn = train_tiny.make_step(config, optimizer)
  held = [stream(np.random.default_rng([args.seed, 1, r]), fmt, args.length, vocab, args.pairs)
          for r in range(args.probe_rows)]
  toks = jnp.asarray(np.stack([h[0] for h in held]))
  rows = np.asarray([r for r, h in enumerate(held) for _ in h[2]])
  pos, truth, latest = (np.asarray([p[j] for h in held for p in h[2]]) for j in range(3))
  forward = jax.jit(lambda p: jnp.argmax(models.forward(config, p, toks), axis=-1))

  def probe(p) -> float:
    return round(float(np.mean(np.asarray(forward(p))[rows, pos] == truth)), 4)

  curve = []
  start = time.time()
  for step in tqdm(range(args.steps), desc=fmt, mininterval=10, disable=args.no_progress):
    if step % args.probe_every == 0:
      curve.append({"step": step, "accuracy": probe(params)})
    batch = [stream(np.random.default_rng([args.seed, 0, step, r]), fmt, args.length, vocab, args.pairs)
             for r in range(args.batch)]
    t, m = np.stack([b[0] for b in batch]), np.stack([b[1] for b in batch])
    lr = train_tiny.learning_rate(cfg, step, step / args.steps)
    params, opt_state, _, _ = step_fn(params, opt_state, jnp.asarray(t), jnp.asarray(m),
                                      jnp.asarray(m, jnp.float32), jnp.float32(lr))
  curve.append({"step": args.steps, "accuracy": probe(params)})
  return {"queries": int(pos.size), "latest": round(float(np.mean(latest == truth)), 4),
          "final_accuracy": curve[-1]["accuracy"], "seconds": round(time.time() - start, 1), "curve": curve}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--pairs", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--probe_every", type=int, default=100)
  parser.add_argument("--probe_rows", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_lr_frac", type=float, default=1.0, help="cosine floor; 1.0 keeps the rate constant")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--no_progress", action="store_true")
  parser.add_argument("--out", default=None, help="write the result JSON here")
  args = parser.parse_args(argv)
  if args.tiny:
    args.steps, args.batch, args.hidden, args.probe_every, args.probe_rows = 4, 4, 16, 2, 8
  for name in ("steps", "batch", "length", "pairs", "hidden", "probe_every", "probe_rows"):
    if getattr(args, name) < 1:
      raise SystemExit(f"error: --{name}={getattr(args, name)} must be >= 1")
  if not 0.0 <= args.min_lr_frac <= 1.0:
    raise SystemExit(f"error: --min_lr_frac={args.min_lr_frac} must be in [0, 1]")
  cfg = dataclasses.replace(
      train_tiny.TrainConfig(), hidden_size=args.hidden, intermediate_size=3 * args.hidden, num_layers=4,
      num_heads=4, num_kv_heads=2, context=args.length, lengths=(args.length,), final_mix=(1.0,),
      steps=args.steps, lr=2e-3, warmup=50, min_lr_frac=args.min_lr_frac)
  result = {"command": command_line("toy/probe_format.py", argv), "machine": machine(),
            "settings": {k: getattr(args, k) for k in ("steps", "batch", "length", "pairs", "hidden", "seed",
                                                        "min_lr_frac")},
            "formats": {}}
  for fmt in args.formats:
    result["formats"][fmt] = run_format(fmt, cfg, args)
    r = result["formats"][fmt]
    print(f"{fmt:7s} final accuracy {r['final_accuracy']:.3f}  latest-record baseline {r['latest']:.3f}  "
          f"({r['seconds']:.0f} s)", flush=True)
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
