"""Measured compression ratio of every preset at several cache lengths, from the bytes its arrays hold.

    python experiments/preset_ratios.py --out experiments/results/preset_ratios.json

Storage is static-shaped, so jax.eval_shape of compress gives exactly the arrays a real run holds
(tests/test_presets.py checks that against materialized caches). Shape: a Llama-3-8B-like layer stack,
32 layers, K = 8 kv heads, N = 32 query heads, H = 128, batch 1, bf16 input.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import akv_jax as akv


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="experiments/results/preset_ratios.json")
  parser.add_argument("--lengths", default="8192,32768,131072")
  parser.add_argument("--layers", type=int, default=32)
  args = parser.parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  shape = dict(layers=args.layers, kv_heads=8, q_heads=32, head_dim=128)
  rows = {}
  for name in akv.presets.names():
    pol = akv.presets.get(name)
    rows[name] = {}
    for s in lengths:
      dense = 2 * 2 * shape["kv_heads"] * s * shape["head_dim"] * args.layers
      held = akv.ratios.held_bytes(pol, akv.ratios.CacheShape(s=s, num_layers=args.layers, kv_heads=8,
                                                              head_dim=128, q_heads=32))
      rows[name][str(s)] = {"held_bytes": held, "dense_bf16_bytes": dense, "ratio": dense / held}
  result = {"command": "python experiments/preset_ratios.py", "shape": shape, "batch": 1, "ratios": rows}
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + "\n")
  header = "| preset | " + " | ".join(f"S={s}" for s in lengths) + " |"
  print(header + "\n|---|" + "---|" * len(lengths))
  for name, per in rows.items():
    print(f"| `{name}` | " + " | ".join(f"{per[str(s)]['ratio']:.2f}x" for s in lengths) + " |")


if __name__ == "__main__":
  main()
