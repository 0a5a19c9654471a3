"""Decode attention on the CPU: compressed caches (XLA paths) against dense bf16, measured side by side.

    python experiments/bench_cpu_attention.py --out experiments/results/bench_cpu_attention.json

One decode step's attention for one layer of a Llama-3-8B-shaped model (K = 8 kv heads, N = 32 query heads,
H = 128), bf16 cache of S tokens, batch B. The compressed layer is the middle layer (L/2 of 32), where
PyramidKV's budget is near its mean, so its measured ratio is close to the policy's whole-model ratio; the
ratio reported is that layer's own, from the bytes its arrays hold.

Measurements are interleaved: each of `--reps` rounds times one call of every variant in turn (after a warm-up,
each synchronized with block_until_ready), so a ratio compares calls made under the same machine conditions (a
shared 2-core VM drifts by 2-3x over minutes). Reported: the median time of each variant, and the speedup as the
median over rounds of (best dense time of the round / compressed time). Baselines: akv.dense_attention on the
bf16 cache and jax.nn.dot_product_attention (XLA).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

import akv_jax as akv
from akv_jax import testing
from experiments import result_files


def interleaved_ms(fns: dict, reps: int) -> dict[str, list[float]]:
  """fns: name -> zero-argument callable. Warm each up, then `reps` rounds of one timed call of each."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(1e3 * (time.perf_counter() - t))
  return times


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="experiments/results/bench_cpu_attention.json")
  parser.add_argument("--seq", type=int, default=32768)
  parser.add_argument("--batch", default="1,4")
  parser.add_argument("--policies", default="kivi2,hybrid_8x,hybrid_12x")
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  args = parser.parse_args(argv)
  kh, n, h, layers = 8, 32, 128, 32
  seq, batches, reps = args.seq, [int(x) for x in args.batch.split(",")], args.reps
  preset = akv.presets.get
  if args.tiny:   # no ratio target is reachable at the smoke shape: the presets' fixed keeps
    kh, n, h, seq, batches, reps, preset = 2, 8, 64, 512, [1], 2, akv.presets.fixed

  dense_fn = jax.jit(akv.dense_attention)
  sdpa_fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
      q[:, None], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), implementation="xla")[:, 0])
  attend = {impl: jax.jit(lambda q, c, impl=impl: akv.attend(q, c, implementation=impl))
            for impl in ("xla", "reference")}
  rows = []
  for b in batches:
    kv = testing.random_kv(0, b=b, k=kh, s=seq, h=h, dtype=jnp.bfloat16)
    q_obs = testing.random_queries(1, b=b, n=n, t=32, h=h, dtype=jnp.bfloat16)
    q = testing.random_queries(2, b=b, n=n, t=None, h=h, dtype=jnp.bfloat16)
    caches = {name: akv.compress(kv, preset(name), queries=q_obs, layer=layers // 2, num_layers=layers)
              for name in args.policies.split(",")}
    fns = {"dense": lambda kv=kv, q=q: dense_fn(q, kv.k, kv.v, kv.lengths),
           "sdpa": lambda kv=kv, q=q: sdpa_fn(q, kv.k, kv.v)}
    for name, ckv in caches.items():
      for impl, fn in attend.items():
        fns[f"{name}/{impl}"] = lambda fn=fn, ckv=ckv, q=q: fn(q, ckv)
    times = interleaved_ms(fns, reps)
    best = [min(d, s_) for d, s_ in zip(times["dense"], times["sdpa"])]
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"B={b} S={seq}: dense_attention {med['dense']:.2f} ms, dot_product_attention {med['sdpa']:.2f} ms")
    for name, ckv in caches.items():
      ratio = akv.compression_ratio(kv, ckv)
      err = float(jnp.max(jnp.abs(attend["xla"](q, ckv).astype(jnp.float32)
                                  - attend["reference"](q, ckv).astype(jnp.float32))))
      speed = {impl: statistics.median([d / c for d, c in zip(best, times[f"{name}/{impl}"])])
               for impl in attend}
      row = dict(policy=name, batch=b, seq=seq, layer_ratio=round(ratio, 2), dense_ms=round(med["dense"], 2),
                 sdpa_ms=round(med["sdpa"], 2), xla_ms=round(med[f"{name}/xla"], 2),
                 reference_ms=round(med[f"{name}/reference"], 2), speedup_xla=round(speed["xla"], 2),
                 speedup_reference=round(speed["reference"], 2), max_abs_diff_xla_vs_reference=err)
      rows.append(row)
      print(f"  {name:11s} ratio {ratio:5.2f}x  xla {row['xla_ms']:7.2f} ms ({row['speedup_xla']:.2f}x)  "
            f"reference {row['reference_ms']:7.2f} ms ({row['speedup_reference']:.2f}x)")
    del caches, kv
  result = dict(command=result_files.command_line("bench_cpu_attention.py", argv),
                machine=result_files.machine(),
                shape=dict(kv_heads=kh, q_heads=n, head_dim=h, layer=layers // 2, num_layers=layers,
                           dtype="bfloat16"),
                reps=reps, rows=rows)
  out = pathlib.Path(args.out)
  result_files.write_json(out, result)
  md = ["| policy | B | S | layer ratio | dense bf16 (best) ms | compressed xla ms | speedup (median of rounds) | reference ms |",
        "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['policy']} | {r['batch']} | {r['seq']} | {r['layer_ratio']}x | "
              f"{min(r['dense_ms'], r['sdpa_ms'])} | {r['xla_ms']} | {r['speedup_xla']}x | {r['reference_ms']} |")
  out.with_suffix(".md").write_text(f"CPU: {result['machine']['processor']}, {result['machine']['cpu_count']} cores, "
                                    f"jax {jax.__version__}\n\n" + "\n".join(md) + "\n")
  return result


if __name__ == "__main__":
  main()
