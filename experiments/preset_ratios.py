"""Measured compression ratio of every preset at several cache lengths, from the bytes its arrays hold.

    python experiments/preset_ratios.py --out experiments/results/preset_ratios.json

Storage is static-shaped, so jax.eval_shape of compress gives exactly the arrays a real run holds
(tests/library/test_presets.py checks that against materialized caches). Shape: a Llama-3-8B-like layer stack,
32 layers, K = 8 kv heads, N = 32 query heads, H = 128, batch 1, bf16 input; under "smollm2" the real model's
(30 layers, K = 3, N = 9, H = 64) at 4096 and 8192 tokens; under "toy" the shipped tiny model's (4 layers, K = 2,
N = 4, H = 64) at 2048. The presets named for a ratio are byte targets (compress solves their keep per shape): each
row gives the keep solved there, and `fixed_keep_ratio` what the preset's fixed keep (akv.presets.fixed) measures,
which drifts with the shape as every preset's did before they became targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import akv_jax as akv  # noqa: E402
from experiments import result_files  # noqa: E402


def _ratios(lengths: list[int], shape: akv.ratios.CacheShape) -> dict:
  """{preset: {S: held bytes, dense bf16 bytes, ratio}} for a cache shape at each length."""
  rows = {}
  for name in akv.presets.names():
    rows[name] = {}
    for s in lengths:
      at = dataclasses.replace(shape, s=s)
      preset = akv.presets.get(name)
      resolved = akv.ratios.resolve_target(preset, at)
      held = akv.ratios.held_bytes(resolved, at)
      row = {"held_bytes": held, "dense_bf16_bytes": at.dense_bf16_bytes(), "ratio": at.dense_bf16_bytes() / held}
      if preset.budget.target is not None:
        row |= {"target": preset.budget.target, "keep": resolved.keep,
                "fixed_keep_ratio": akv.ratios.measured_ratio(preset.with_target(None), at)}
      rows[name][str(s)] = row
  return rows


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="experiments/results/preset_ratios.json")
  parser.add_argument("--lengths", default="8192,32768,131072")
  parser.add_argument("--layers", type=int, default=32)
  args = parser.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  shape = dict(layers=args.layers, kv_heads=8, q_heads=32, head_dim=128)
  rows = _ratios(lengths, akv.ratios.CacheShape(s=1, num_layers=args.layers, kv_heads=8, head_dim=128, q_heads=32))
  smollm2 = dict(layers=30, kv_heads=3, q_heads=9, head_dim=64)
  result = {"command": result_files.command_line("preset_ratios.py", argv), "shape": shape, "batch": 1,
            "ratios": rows,
            "smollm2": {"shape": smollm2, "ratios": _ratios(
                [4096, 8192], akv.ratios.CacheShape(s=1, num_layers=30, kv_heads=3, head_dim=64, q_heads=9))},
            "toy": {"shape": dict(layers=4, kv_heads=2, q_heads=4, head_dim=64), "ratios": _ratios(
                [2048], akv.ratios.CacheShape(s=1, num_layers=4, kv_heads=2, head_dim=64, q_heads=4))}}
  result_files.write_json(args.out, result)
  header = "| preset | " + " | ".join(f"S={s}" for s in lengths) + " |"
  print(header + "\n|---|" + "---|" * len(lengths))
  for name, per in rows.items():
    print(f"| `{name}` | " + " | ".join(f"{per[str(s)]['ratio']:.2f}x" for s in lengths) + " |")


if __name__ == "__main__":
  main()
