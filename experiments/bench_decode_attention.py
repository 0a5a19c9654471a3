"""Fused decode attention on a GPU: achieved bandwidth and speedup over the best bf16 dense decode attention.

    python experiments/bench_decode_attention.py --out $OUT/bench_decode_attention.json      (on a GPU)
    python experiments/bench_decode_attention.py --tiny --out /tmp/b.json                    (CPU smoke, interpret)

One layer of a Llama-3-8B-shaped model (K = 8 kv heads, N = 32 query heads, H = 128), bf16 cache of S tokens,
batch B; the compressed layer is the middle one of 32 (PyramidKV's budget is near its mean there), compressed by
akv.compress from random bf16 K/V, and its own compression ratio is reported.

Timing: each measurement is one jitted lax.fori_loop of `--inner` calls whose query depends on the previous
output (so calls cannot be merged or overlapped) and whose cache rides in the carry through an optimization
barrier (so no work on it is hoisted out of the loop, for the baselines either), synchronized with
block_until_ready; the median of `--reps` such loops, divided by `--inner`. That removes per-call dispatch from
kernels that run for microseconds. Every policy runs at every (S, B); the chunked XLA path over the same
compressed cache is the second compressed baseline.

Bandwidth: bytes the fused kernel must read (every array it loads: codes, scales, mins, bf16 sinks and recent
window, page table; not the positions) / time, against a device-to-device copy of 4 GiB measured in the same run
(counting bytes read plus written, the usual convention). Dense baselines on the uncompressed bf16 cache:
jax.nn.dot_product_attention with implementation "xla" and "cudnn", and JAX's own Pallas GQA decode kernel
(jax.experimental.pallas.ops.gpu.decode_attention.gqa); a baseline that fails to run is recorded with its error.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time
from typing import Callable

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

import akv_jax as akv
from akv_jax import testing
from experiments.result_files import command_line, machine, write_json


def loop_time_ms(step: Callable, q: jax.Array, *args, inner: int, reps: int) -> float:
  """Median ms per call of step(q, *args) -> out [B, N, H], chained `inner` times inside one jit.

  The cache (args) rides in the loop's carry through an optimization barrier, so XLA cannot prove it loop
  invariant and hoist work on it (a transpose, a dequantization) out of the timed loop; the next query depends on
  the previous output, so calls cannot be merged or overlapped.
  """
  @jax.jit
  def run(q, *args):
    def body(_, carry):
      q, args = jax.lax.optimization_barrier(carry)
      out = step(q, *args)
      return q + (out * 0).astype(q.dtype), args   # a true dependency on the previous call, numerically a no-op
    return jax.lax.fori_loop(0, inner, body, (q, args))[0]

  jax.block_until_ready(run(q, *args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(run(q, *args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times) / inner


def copy_bandwidth(gib: float, reps: int) -> float:
  """Device-to-device copy, GB/s counting bytes read plus written."""
  n = int(gib * (1 << 30)) // 4
  x = jnp.ones((n,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)   # one read and one write per element
  jax.block_until_ready(copy(x))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(copy(x))
    times.append(time.perf_counter() - t)
  return 2 * n * 4 / statistics.median(times) / 1e9


def read_bytes(ckv: akv.CompressedKV) -> int:
  """Bytes the fused kernel loads from a cache: everything it stores except the token positions and the decode
  rule's state."""
  skip = {id(ckv.body_pos), id(ckv.recent_pos), id(ckv.next_pos), id(ckv.dropped)}
  skip |= {id(x) for x in jax.tree_util.tree_leaves(ckv.state)}   # the decode rule's state (H2O's totals)
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(ckv) if id(x) not in skip)


def dense_baselines(interpret: bool) -> dict[str, Callable]:
  """Dense bf16 decode attention: q [B, N, H], k, v [B, S, K, H] (the layout these APIs take)."""
  def sdpa(impl):
    return lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v, implementation=impl)[:, 0]
  out = {"sdpa_xla": sdpa("xla"), "sdpa_cudnn": sdpa("cudnn")}
  try:
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode  # noqa: PLC0415
    out["jax_pallas_gqa"] = lambda q, k, v: jax_decode.gqa(q, k, v, interpret=interpret)
  except ImportError as e:  # removed in a later JAX
    out["jax_pallas_gqa"] = e
  return out


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="experiments/results/bench_decode_attention.json")
  parser.add_argument("--seqs", default="16384,32768,65536,4096")   # the goal's shapes first: a cut run keeps them
  parser.add_argument("--batches", default="8,32,1")
  parser.add_argument("--policies", default="kivi2,hybrid_8x,hybrid_12x")
  parser.add_argument("--inner", type=int, default=10)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--check_tokens", type=int, default=1 << 17,
                      help="compare the kernel with the f32 reference where B * S is at most this (the reference "
                           "dequantizes the whole cache to f32)")
  parser.add_argument("--tiny", action="store_true", help="CPU smoke run in interpret mode")
  args = parser.parse_args(argv)
  kh, n, h, layers = 8, 32, 128, 32
  seqs = [int(x) for x in args.seqs.split(",")]
  batches = [int(x) for x in args.batches.split(",")]
  policies = args.policies.split(",")
  inner, reps, gib = args.inner, args.reps, 4.0
  interpret = args.tiny
  preset = akv.presets.get
  if args.tiny:   # no ratio target is reachable at the smoke shape: the presets' fixed keeps
    kh, n, h, seqs, batches, inner, reps, gib = 2, 8, 64, [512], [1], 2, 1, 0.01
    preset = akv.presets.fixed

  copy_gbs = copy_bandwidth(gib, reps)
  print(f"device {jax.devices()[0].device_kind}: copy {copy_gbs:.0f} GB/s (read + write)")
  baselines = dense_baselines(interpret)
  meta = dict(command=command_line("bench_decode_attention.py", argv), machine=machine(),
              copy_gbs=round(copy_gbs, 1), inner=inner, reps=reps, interpret=interpret,
              shape=dict(kv_heads=kh, q_heads=n, head_dim=h, layer=layers // 2, num_layers=layers))
  rows = []
  for s in seqs:
    for b in batches:
      kv = testing.random_kv(0, b=b, k=kh, s=s, h=h, dtype=jnp.bfloat16)
      q_obs = testing.random_queries(1, b=b, n=n, t=32, h=h, dtype=jnp.bfloat16)
      q = testing.random_queries(2, b=b, n=n, t=None, h=h, dtype=jnp.bfloat16)
      k_bshd, v_bshd = kv.k.transpose(0, 2, 1, 3), kv.v.transpose(0, 2, 1, 3)
      dense = {}
      for name, fn in baselines.items():
        if isinstance(fn, Exception):
          dense[name] = f"unavailable: {fn}"
          continue
        try:
          dense[name] = round(loop_time_ms(fn, q, k_bshd, v_bshd, inner=inner, reps=reps), 4)
        except Exception as e:  # noqa: BLE001 (a baseline that cannot run here is reported, not fatal)
          dense[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
      timed = [v for v in dense.values() if isinstance(v, float)]
      best = min(timed) if timed else float("nan")
      dense_bytes = 2 * kv.k.size * kv.k.dtype.itemsize
      print(f"S={s} B={b}: dense {dense}")
      for name in policies:
        ckv = akv.compress(kv, preset(name), queries=q_obs, layer=layers // 2, num_layers=layers)
        fused = lambda q, c: akv.attend(q, c, implementation="pallas", interpret=interpret)  # noqa: E731
        ms = loop_time_ms(fused, q, ckv, inner=inner, reps=reps)
        # The chunked XLA path over the same compressed cache: the compressed baseline without the kernel.
        xla = lambda q, c: akv.attend(q, c, implementation="xla")  # noqa: E731
        try:
          xla_ms = round(loop_time_ms(xla, q, ckv, inner=inner, reps=reps), 4)
        except Exception as e:  # noqa: BLE001 (reported, not fatal)
          xla_ms = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        err = None
        if b * s <= args.check_tokens:
          err = float(jnp.max(jnp.abs(akv.attend(q, ckv, implementation="pallas", interpret=interpret)
                                      .astype(jnp.float32)
                                      - akv.attend(q, ckv, implementation="reference").astype(jnp.float32))))
        nbytes = read_bytes(ckv)
        row = dict(policy=name, seq=s, batch=b, layer_ratio=round(akv.compression_ratio(kv, ckv), 2),
                   fused_ms=round(ms, 4), read_bytes=nbytes, achieved_gbs=round(nbytes / ms / 1e6, 1),
                   copy_fraction=round(nbytes / ms / 1e6 / copy_gbs, 3), xla_chunked_ms=xla_ms, dense_ms=dense,
                   dense_best_ms=best, speedup_vs_best_dense=round(best / ms, 2),
                   dense_bytes=dense_bytes, dense_best_copy_fraction=round(dense_bytes / best / 1e6 / copy_gbs, 3),
                   max_abs_diff_vs_reference=err)
        rows.append(row)
        print(f"  {name:11s} {row['layer_ratio']:5.2f}x  {ms:.4f} ms  {row['achieved_gbs']:.0f} GB/s "
              f"({row['copy_fraction']:.0%} of copy)  {row['speedup_vs_best_dense']:.2f}x vs dense  "
              f"xla {xla_ms}  err {err}")
        del ckv
      del kv, k_bshd, v_bshd
      write(args.out, dict(meta, rows=rows))
  return dict(meta, rows=rows)


def write(path: str, result: dict) -> dict:
  """Write the rows measured so far (json and a markdown table). Called after every (S, B), so a run cut short
  by its time limit still leaves what it measured."""
  copy_gbs, rows = result["copy_gbs"], result["rows"]
  write_json(path, result)
  host = result["machine"]
  md = [f"{host['device_kind']}, jax {host['jax']}; copy bandwidth {copy_gbs:.0f} GB/s (read + write)", "",
        "| policy | S | B | layer ratio | fused ms | GB/s read | % of copy | chunked XLA ms | best dense ms | "
        "dense % of copy | speedup vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    md.append(f"| {r['policy']} | {r['seq']} | {r['batch']} | {r['layer_ratio']}x | {r['fused_ms']} | "
              f"{r['achieved_gbs']} | {r['copy_fraction']:.0%} | {r['xla_chunked_ms']} | {r['dense_best_ms']} | "
              f"{r['dense_best_copy_fraction']:.0%} | {r['speedup_vs_best_dense']}x |")
  pathlib.Path(path).with_suffix(".md").write_text("\n".join(md) + "\n")
  return result


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
