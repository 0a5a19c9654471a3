"""Budgets split across layers per request (`adaptive`: AdaKV over every layer and kv head of a layer group, one
page pool per group) on SmolLM2-135M-Instruct, against per-layer splits at equal measured bytes.

    python experiments/adaptive_smollm2.py --out experiments/results/adaptive_smollm2_4k.json
    python experiments/adaptive_smollm2.py --tiny --out /tmp/adaptive.json     # random 2-layer model, seconds

Three measurements, each side by side in one run:
  overhead      prefill time (the model pass, scoring, the split and compression) of adaptive against adakv at the
                first ratio, batch 1 at `length` tokens, after a warm-up, `reps` alternating repetitions each;
  spread        how differently adaptive splits a request's tokens across layers from task to task: for
                `samples` question-aware prompts of each task, the share of the selected tokens each layer got
                (mean over prompts and kv heads), and the total-variation distance between every two tasks'
                layer shares (0: the same split; 1: disjoint);
  continuation  the continuation NLL of `plays` after `length` tokens (experiments/real_eval.continuation) for
                snapkv, pyramidkv, adakv and adaptive, each fitted to every ratio of `ratios` on this model
                (policy@Nx), against the full cache.
Writes one JSON file and prints the tables.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import akv_jax as akv  # noqa: E402
from akv_jax import models  # noqa: E402
from experiments import plots, real_eval, result_files  # noqa: E402

FAMILIES = ("snapkv", "pyramidkv", "adakv", "adaptive")
TASKS = ("niah_single_noise", "niah_multikey", "variable_tracking", "common_words", "frequent_words")


def layer_shares(cache, row: int) -> np.ndarray:
  """f64[L]: the share of row `row`'s selected body tokens (its pages, summed over kv heads; prefilled without
  decode room, so every page holds selected tokens) that each layer holds."""
  got = np.array([float(jnp.sum(c.page_table[row] >= 0)) for c in cache])
  return got / got.sum()


def spread(model: real_eval.RealModel, policy: akv.Policy, tasks, length: int, samples: int, seed: int) -> dict:
  """Per task, the mean layer shares of `policy` over `samples` question-aware prompts (one batch per task, padded
  to `length`), and the pairwise total-variation distances between tasks."""
  shares = {}
  for name in tasks:
    group = real_eval.draw_samples(model, [name], length, samples, seed)
    tokens, lengths = real_eval.pad_rows([s.context_ids + s.question_ids for s in group], length)
    _, cache = models.prefill(model.config, model.params, tokens, lengths, policy)
    shares[name] = np.mean([layer_shares(cache, r) for r in range(len(group))], axis=0)
  tv = {f"{a} vs {b}": round(0.5 * float(np.abs(shares[a] - shares[b]).sum()), 4)
        for a, b in itertools.combinations(tasks, 2)}
  return dict(policy=policy.name, shares={k: [round(float(x), 4) for x in v] for k, v in shares.items()},
              total_variation=tv)


def overhead(model: real_eval.RealModel, policies, length: int, reps: int) -> dict:
  """Seconds per prefill of each policy at batch 1, warmed up, repetitions alternating between the policies."""
  tokens = real_eval.play_tokens(model, ["hamlet"], length)
  lengths = jnp.full((1,), length, jnp.int32)

  def run(pol):
    logits, cache = models.prefill(model.config, model.params, tokens, lengths, pol)
    jax.block_until_ready((logits, cache))

  for pol in policies:   # compile
    run(pol)
  times = {p.name: [] for p in policies}
  for _ in range(reps):
    for pol in policies:
      start = time.perf_counter()
      run(pol)
      times[pol.name].append(time.perf_counter() - start)
  best = {k: min(v) for k, v in times.items()}
  base, adaptive = policies[0].name, policies[-1].name
  return dict(seconds={k: [round(x, 4) for x in v] for k, v in times.items()},
              best={k: round(v, 4) for k, v in best.items()},
              overhead=round(best[adaptive] / best[base] - 1, 4), against=base, length=length)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="experiments/results/adaptive_smollm2_4k.json")
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--ratios", default="8,12,16", help="measured ratios every family is fitted to")
  parser.add_argument("--plays", default="hamlet,macbeth,the-tempest")
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--samples", type=int, default=4, help="prompts per task for the spread")
  parser.add_argument("--reps", type=int, default=5, help="timed prefills per policy for the overhead")
  parser.add_argument("--tokens", type=int, default=512, help="continuation tokens")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--tiny", action="store_true", help="random 2-layer model at 512 tokens (a smoke run)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  model = real_eval.load_smollm2()
  length, tokens, plays, tasks = args.length, args.tokens, args.plays.split(","), args.tasks.split(",")
  ratios = [float(r) for r in args.ratios.split(",")]
  if args.tiny:
    model, length, tokens, plays, tasks = real_eval.random_model(model), 512, 16, plays[:1], tasks[:2]
  shape = real_eval.cache_shape(model, length)
  fitted = {(fam, r): real_eval.resolve_policy(f"{fam}@{r:g}x", shape) for r in ratios for fam in FAMILIES}
  print("overhead ...", flush=True)
  cost = overhead(model, [fitted["adakv", ratios[0]], fitted["adaptive", ratios[0]]], length, args.reps)
  print(f"prefill at {length}: {cost['best']} (adaptive {cost['overhead']:+.1%} against adakv)", flush=True)
  print("spread ...", flush=True)
  split = spread(model, fitted["adaptive", ratios[0]], tasks, min(length, model.config.max_seq_len - 64),
                 args.samples, args.seed)
  policies = [akv.presets.get("full")] + list(fitted.values())
  cont = real_eval.continuation(model, policies, plays, length, tokens, progress=not args.no_progress)
  result = dict(command=result_files.command_line("adaptive_smollm2.py", argv), machine=result_files.machine(),
                model=model.name, length=length, overhead=cost, spread=split,
                policies={p.name: p.to_dict() for p in policies}, continuation=cont,
                seconds=round(time.perf_counter() - start, 1))
  result_files.write_json(args.out, result)
  plot = pathlib.Path(args.out).with_suffix(".png")
  plots.continuation_vs_ratio(cont["policies"], plot, family=lambda n: n.split("@")[0],
                              title=f"selection families at equal measured bytes on {model.name} after {length} tokens")
  print(f"{'task pair':44s} total variation of the layer shares")
  for pair, tv in split["total_variation"].items():
    print(f"{pair:44s} {tv:.4f}")
  print(real_eval.continuation_table(cont["policies"]))
  print(f"wrote {args.out} and {plot} in {result['seconds']:.0f} s")
  return result


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
