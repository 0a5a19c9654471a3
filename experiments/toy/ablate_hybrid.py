"""Ablation: selection only, quantization only and their hybrid at matched bytes (5x, 8x, 12x) on the shipped model.

    python experiments/toy/ablate_hybrid.py --out experiments/results/ablation_2048 [--set key=value ...] [--tiny]

For each target ratio, and at quantization's own ratio, the three variants are tuned to hold the same bytes on this
model's caches (ratio measured from the arrays of an eval_shape'd prefill, which equals a real one's since storage
is static-shaped):
  selection   SnapKV (window 32, 4 sinks, 32 recent), bf16, keep fraction bisected to the target;
  quantize    KIVI (keys per channel, values per token, groups of 32, 128 recent bf16) at 2 bits, all tokens: it
              cannot go past its own ratio, so targets above it are reported as out of reach;
  hybrid      the same SnapKV selection, then KIVI 2-bit, keep fraction bisected to the target.
No guard layers, so the composition is measured alone. All variants and the full cache see the same prompts
(the toy runner's settings, experiments/toy/sweep.yaml, whose policies list is not read here; overridable with
--set); the table says whether the gains multiply:
at equal bytes, does hybrid keep more accuracy than either alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp

import akv_jax as akv
from akv_jax import models
from experiments import model_eval, result_files
from experiments.toy import sweep

TARGETS = (5.0, 8.0, 12.0)
_SNAP = dict(selection="snapkv", window=32, n_sink=4)
_KIVI2 = dict(key_bits=2, value_bits=2, key_group=32, value_group=32, key_axis="channel")


def measured_ratio(config, params, policy: akv.Policy, length: int) -> float:
  toks = jax.ShapeDtypeStruct((1, length), jnp.int32)
  lens = jax.ShapeDtypeStruct((1,), jnp.int32)
  cache = jax.eval_shape(lambda t, n: models.prefill(config, params, t, n, policy)[1], toks, lens)
  return model_eval.dense_cache_bytes(config, 1, length) / akv.nbytes(cache)


def selection(keep: float) -> akv.Policy:
  return akv.Policy(name=f"snapkv_keep{keep:.3f}", keep=keep, recent=32, **_SNAP)


def hybrid(keep: float) -> akv.Policy:
  return akv.Policy(name=f"snapkv{keep:.3f}+kivi2", keep=keep, recent=128, **_SNAP, **_KIVI2)


def quantize() -> akv.Policy:
  return akv.Policy(name="kivi2", recent=128, **_KIVI2)


def match(make, target: float, ratio_of, lo: float = 0.01, hi: float = 1.0, steps: int = 14):
  """Bisects keep so that ratio_of(make(keep)) is closest to target; None if even `lo` stays below it."""
  if ratio_of(make(lo)) < target:
    return None
  for _ in range(steps):
    mid = (lo + hi) / 2
    if ratio_of(make(mid)) >= target:
      lo = mid
    else:
      hi = mid
  return make(round(lo, 4))


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=str(sweep.CONFIG))
  parser.add_argument("--out", default="experiments/results/ablation_2048")
  parser.add_argument("--targets", default=",".join(str(t) for t in TARGETS))
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    cfg = sweep.load_config(args.config, sets=tuple(args.sets) + (f"out={args.out}",), tiny=args.tiny)
    targets = [float(t) for t in args.targets.split(",")]
    config, params, _ = sweep.load_model(cfg, None)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  length = cfg.lengths[-1]
  ratio_of = lambda p: measured_ratio(config, params, p, length)  # noqa: E731
  prompts = model_eval.draw_prompts(cfg.tasks, cfg.lengths, cfg.samples, cfg.batch, cfg.seed)
  progress = not args.no_progress
  evaluated: dict[str, dict] = {}

  def score(policy: akv.Policy) -> dict:
    if policy.name not in evaluated:
      e = model_eval.accuracy(config, params, policy, prompts, progress=progress)
      evaluated[policy.name] = dict(policy=policy.to_dict(), ratio=round(e["compression_ratio"], 3),
                                    average=e["accuracy"][str(length)]["average"], accuracy=e["accuracy"])
    return evaluated[policy.name]

  full = score(akv.presets.get("full"))
  quant = quantize()
  quant_ratio = ratio_of(quant)
  # Quantization alone stops at its own ratio; compare all three there too.
  targets = sorted({round(quant_ratio, 2), *targets})
  rows = []
  for target in targets:
    # The smallest keep that still holds the sinks and the bf16 recent window (compress refuses less).
    variants = {"selection": match(selection, target, ratio_of, lo=(4 + 32 + 2) / length),
                "hybrid": match(hybrid, target, ratio_of, lo=(4 + 128 + 2) / length),
                "quantize": quant if quant_ratio >= 0.97 * target else None}
    for kind, policy in variants.items():
      if policy is None:
        reach = f"{quant_ratio:.2f}x" if kind == "quantize" else "the smallest keep that holds the guard bands"
        rows.append(dict(target=target, variant=kind, policy=None, note=f"out of reach (at most {reach})"))
        continue
      e = score(policy)
      rows.append(dict(target=target, variant=kind, policy=policy.name, ratio=e["ratio"], average=e["average"],
                       retained=round(e["average"] / full["average"], 4) if full["average"] else None))
      print(f"{target}x {kind:9s} {policy.name:22s} ratio {e['ratio']:.2f}x average {e['average']:.3f}", flush=True)
  results = dict(command=result_files.command_line("toy/ablate_hybrid.py", argv), config=dataclasses.asdict(cfg),
                 machine=result_files.machine(), length=length, full=full, rows=rows, evaluated=evaluated)
  out = pathlib.Path(cfg.out)
  result_files.write_json(out / "results.json", results)
  md = [f"# Selection x quantization at matched bytes, {length} tokens (full cache: {full['average']:.3f})", "",
        "| target | variant | policy | measured ratio | average | retained |", "|---:|---|---|---:|---:|---:|"]
  for r in rows:
    if r["policy"] is None:
      md.append(f"| {r['target']:g}x | {r['variant']} | {r['note']} | | | |")
    else:
      md.append(f"| {r['target']:g}x | {r['variant']} | `{r['policy']}` | {r['ratio']:.2f}x | {r['average']:.3f} | "
                f"{r['retained']:.3f} |")
  (out / "report.md").write_text("\n".join(md) + "\n")
  print("\n".join(md))
  return results


if __name__ == "__main__":
  main()
