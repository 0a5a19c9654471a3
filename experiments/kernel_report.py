"""Static cost of the fused decode-attention kernel on sm_90 (H100/H200), measured on a machine without a GPU.

    pip install -e '.[kernel-report]'
    python experiments/kernel_report.py --out experiments/results/kernel_report

For each policy, the kernel bench_decode_attention.py times (one layer of a Llama-3-8B-shaped model: K = 8 kv
heads, N = 32 query heads, H = 128, bf16 cache of S tokens, batch B; the middle layer of 32 compressed by
akv.compress from random bf16 K/V) is lowered for CUDA, its Triton IR compiled for sm_90 with the triton wheel,
and measured by pallas_kernels.cost: registers, spills, tensor cores or FMAs for the dots, the main loop's
instruction mix, and warp-instructions per token per kv head. JAX's own Pallas GQA decode kernel on the dense
bf16 cache of the same shape is the baseline row (recorded with its error if it does not lower).

The caches are built as shapes (jax.eval_shape of the same akv.compress call): lowering reads only shapes and
dtypes, and compressing 2 x B x 8 x S x 128 random bf16 values on a CPU would take minutes for nothing.

Writes <out>/report.json and <out>/report.md. The counts come from the triton wheel's compiler, not the one
inside XLA that builds the kernel on a GPU: compare kernel designs with them, do not read them as a profile.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import jaxlib

import akv_jax as akv
from akv_jax import fused, testing
from experiments.result_files import command_line, machine, write_json
from pallas_kernels import cost

KV_HEADS, Q_HEADS, HEAD_DIM, LAYERS = 8, 32, 128, 32
GQA_BLOCK_K, GQA_SPLITS = 128, 16   # jax_decode.gqa's defaults, passed explicitly: its step comes from them


def compressed_shapes(policy: str, *, b: int, s: int) -> akv.CompressedKV:
  """The cache bench_decode_attention.py builds for `policy`, as ShapeDtypeStructs."""
  def build():
    kv = testing.random_kv(0, b=b, k=KV_HEADS, s=s, h=HEAD_DIM, dtype=jnp.bfloat16)
    q_obs = testing.random_queries(1, b=b, n=Q_HEADS, t=32, h=HEAD_DIM, dtype=jnp.bfloat16)
    return akv.compress(kv, akv.presets.get(policy), queries=q_obs, layer=LAYERS // 2, num_layers=LAYERS)
  return jax.eval_shape(build)


def step_layout(ckv: akv.CompressedKV) -> tuple[int, int]:
  """(tokens one main-loop step covers, kv heads one program serves) of the fused kernel on `ckv`: `Format.block`
  body slots per step, one kv head per program (the grid is (B, K, splits))."""
  return fused.body_format(ckv).block, 1


def fused_rows(policy: str, *, b: int, s: int, num_warps: int | None = None) -> list[dict]:
  """One row per Triton module of the fused attention (today exactly one); num_warps: the kernel's default
  when None, else that many warps per program (the row's label says so)."""
  ckv = compressed_shapes(policy, b=b, s=s)
  q = jax.ShapeDtypeStruct((b, Q_HEADS, HEAD_DIM), jnp.bfloat16)
  tokens, heads = step_layout(ckv)
  modules = cost.capture_triton_modules(lambda q, c: fused.attend(q, c, interpret=False, num_warps=num_warps),
                                        q, ckv)
  label = policy if num_warps is None else f"{policy} ({num_warps} warps)"
  return [dict(policy=label, **cost.kernel_cost(m, tokens_per_step=tokens, kv_heads_per_program=heads).to_dict())
          for m in modules]


def gqa_rows(*, b: int, s: int) -> list[dict]:
  """JAX's Pallas GQA decode kernel on the dense bf16 cache: one step is block_k tokens (or the whole split
  when shorter) of one kv head (it is vmapped over rows and kv heads; block_h covers that head's queries)."""
  name = "jax_pallas_gqa"
  try:
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode  # noqa: PLC0415
  except ImportError as e:  # removed in a later JAX
    return [dict(policy=name, error=f"unavailable: {e}")]
  q = jax.ShapeDtypeStruct((b, Q_HEADS, HEAD_DIM), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, s, KV_HEADS, HEAD_DIM), jnp.bfloat16)
  try:
    modules = cost.capture_triton_modules(
        lambda q, k, v: jax_decode.gqa(q, k, v, block_k=GQA_BLOCK_K, k_splits=GQA_SPLITS), q, kv, kv)
    tokens = min(GQA_BLOCK_K, s // GQA_SPLITS)
    return [dict(policy=name, **cost.kernel_cost(m, tokens_per_step=tokens, kv_heads_per_program=1).to_dict())
            for m in modules]
  except Exception as e:  # noqa: BLE001 (a baseline that does not lower here is reported, not fatal)
    return [dict(policy=name, error=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")]


def _summary(row: dict) -> str:
  mix = row["main_loop_mix"]
  loop = f"{mix['instructions']} instr/warp/step" if mix else "no loop"
  per_token = row["warp_instructions_per_token_per_kv_head"]
  return (f"{row['policy']:15s} {row['name']}: {row['registers']} regs, {row['stack_bytes']} B stack, "
          f"mma {'yes' if row['mma'] else 'no'}, {loop}, {row['tokens_per_step']} tokens/step, "
          f"{per_token if per_token is None else round(per_token, 1)} warp-instr/token/kv head")


def _mix_text(classes: dict[str, int], top: int = 6) -> str:
  return ", ".join(f"{k} {v}" for k, v in list(classes.items())[:top])


def markdown(result: dict) -> str:
  """A summary table (one row per kernel) and, per kernel, its main loop's full instruction mix."""
  meta = result["meta"]
  tools = meta["toolchain"]
  md = ["# Decode-attention kernel cost on sm_90 (static, from SASS)", "",
        f"`{meta['command']}`; S = {meta['seq']}, B = {meta['batch']}, K = {KV_HEADS}, N = {Q_HEADS}, "
        f"H = {HEAD_DIM}, layer {LAYERS // 2} of {LAYERS}.", "",
        f"jax {meta['jax']}, jaxlib {meta['jaxlib']}, triton {tools['triton']} (ptxas {tools['ptxas']}, "
        f"cuobjdump {tools['cuobjdump']}); {meta['machine']}; {meta['seconds']} s.", "",
        "Stack = per-thread local memory (register spills); spill st/ld = bytes of spill stores/loads ptxas "
        "emits; instr/warp = SASS instructions in one trip of the main loop (the innermost loop with the most "
        "instructions); per token = instr/warp x warps / (tokens per step x kv heads per program). Compiled by "
        "the triton wheel, not by the Triton inside XLA that builds the kernel on a GPU: for comparing designs, "
        "not a profile.", "",
        "| policy | kernel | grid | warps | stages | regs | stack B | spill st/ld B | LDL/STL | mma | FMA dot | "
        "instr/warp/step | tokens/step | warp-instr/token/kv head | main-loop mix (top classes) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    if "error" in r:
      md.append(f"| {r['policy']} | {r['error']} |" + " |" * 13)
      continue
    mix = r["main_loop_mix"]
    per_token = r["warp_instructions_per_token_per_kv_head"]
    md.append(f"| {r['policy']} | {r['name']} | {tuple(r['grid'])} | {r['num_warps']} | {r['num_stages']} | "
              f"{r['registers']} | {r['stack_bytes']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | "
              f"{r['local_loads']}/{r['local_stores']} | {'yes' if r['mma'] else 'no'} | "
              f"{'yes' if r['fma_dot'] else 'no'} | {mix['instructions'] if mix else '-'} | "
              f"{r['tokens_per_step']} | {'-' if per_token is None else round(per_token, 1)} | "
              f"{_mix_text(mix['classes']) if mix else '-'} |")
  for r in result["rows"]:
    if "error" in r or not r["main_loop_mix"]:
      continue
    mix = r["main_loop_mix"]
    md += ["", f"## {r['policy']}: main loop, {mix['instructions']} instructions per warp per "
           f"{r['tokens_per_step']}-token step", "",
           "| class | count |", "|---|---|", *(f"| {k} | {v} |" for k, v in mix["classes"].items()), "",
           "Memory instructions: " + ", ".join(f"{k} {v}" for k, v in mix["memory"].items()), "",
           "All loops (start-end address: instructions): " + ", ".join(
               f"{lp['start']:#x}-{lp['end']:#x}: {lp['instructions']}" for lp in r["loops"]), "",
           "Opcodes: " + ", ".join(f"{k} {v}" for k, v in mix["opcodes"].items())]
  return "\n".join(md) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="experiments/results/kernel_report", help="folder for report.json/.md")
  parser.add_argument("--seq", type=int, default=16384, help="prompt tokens S")
  parser.add_argument("--batch", type=int, default=8, help="rows B")
  parser.add_argument("--policies", default="kivi2,hybrid_8x,hybrid_12x")
  parser.add_argument("--num_warps", default="",
                      help="comma-separated warps per program to report each policy at (default: the kernel's)")
  parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                      help="also report JAX's Pallas GQA decode kernel on the dense cache")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  rows = []
  warps = [int(w) for w in args.num_warps.split(",")] if args.num_warps else [None]
  jobs = [functools.partial(fused_rows, p, b=args.batch, s=args.seq, num_warps=w)
          for p in args.policies.split(",") for w in warps]
  if args.baseline:
    jobs.append(functools.partial(gqa_rows, b=args.batch, s=args.seq))
  for job in jobs:
    new = job()
    rows += new
    for r in new:
      print(f"{r['policy']:15s} {r['error']}" if "error" in r else _summary(r))
  host = machine()
  meta = dict(command=command_line("kernel_report.py", argv), seq=args.seq, batch=args.batch,
              shape=dict(kv_heads=KV_HEADS, q_heads=Q_HEADS, head_dim=HEAD_DIM, layer=LAYERS // 2,
                         num_layers=LAYERS),
              jax=jax.__version__, jaxlib=jaxlib.__version__, toolchain=cost.toolchain(),
              python=host["python"],
              machine=f"{host['machine']}, {host['cpu_count']} CPUs, backend {host['backend']}",
              seconds=round(time.perf_counter() - start, 1))
  result = dict(meta=meta, rows=rows)
  out = pathlib.Path(args.out)
  write_json(out / "report.json", result)
  (out / "report.md").write_text(markdown(result))
  print(f"wrote {out / 'report.json'} and {out / 'report.md'} in {meta['seconds']} s")
  return result


if __name__ == "__main__":
  main()
