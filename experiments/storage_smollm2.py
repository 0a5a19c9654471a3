"""Rotated storage and outlier key channels on SmolLM2-135M-Instruct: does low-bit KIVI hold better with them?

    python experiments/storage_smollm2.py --out experiments/results/storage_smollm2_4k.json
    python experiments/storage_smollm2.py --tiny --out /tmp/storage.json    # random 2-layer model, seconds

For each width in `widths` (KIVI layout: keys per channel, values per token, groups of 32, a 128-token bf16
window), four storages of every token: plain codes, rotated (akv_jax.rotation: a randomized Hadamard transform per
layer and kv head), `outliers` key channels per kv head held at 16 bits (akv_jax.outliers, ranked on the last 32
prompt queries), and both. Each is measured by the continuation NLL of `plays` after `length` tokens
(experiments/real_eval.continuation: prefill, compress, teacher-force 512 tokens through decode_step, so tokens
appended while decoding are stored the same way) against the full cache, with the bytes held from the arrays.
Writes one JSON file with the rows and prints the table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import akv_jax as akv  # noqa: E402
from experiments import plots, real_eval, result_files  # noqa: E402


def variants(bits: int, outliers: int) -> list[str]:
  """kivi{bits} plain, rotated, with outlier key channels, and both, as preset names (akv.presets.get)."""
  base = f"kivi{bits}"
  return [base, f"{base}+rot", f"{base}+out{outliers}", f"{base}+rot+out{outliers}"]


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="experiments/results/storage_smollm2_4k.json")
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--plays", default="hamlet,macbeth,the-tempest")
  parser.add_argument("--widths", default="2,3", help="KIVI widths to measure the four storages at")
  parser.add_argument("--outliers", type=int, default=4, help="outlier key channels per kv head")
  parser.add_argument("--tokens", type=int, default=512, help="continuation tokens")
  parser.add_argument("--tiny", action="store_true", help="random 2-layer model at 512 tokens (a smoke run)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  model = real_eval.load_smollm2()
  length, tokens, plays = args.length, args.tokens, args.plays.split(",")
  if args.tiny:
    model, length, tokens, plays = real_eval.random_model(model), 512, 16, plays[:1]
  names = ["full"] + [n for w in args.widths.split(",") for n in variants(int(w), args.outliers)] + ["kivi4"]
  policies = [akv.presets.get(n) for n in dict.fromkeys(names)]
  for p in policies:
    print(f"{p.name:20s} keys={p.keys} rotation={p.rotation}", flush=True)
  cont = real_eval.continuation(model, policies, plays, length, tokens, progress=not args.no_progress)
  result = dict(command=result_files.command_line("storage_smollm2.py", argv), machine=result_files.machine(),
                model=model.name, length=length, outliers=args.outliers,
                policies={p.name: p.to_dict() for p in policies}, continuation=cont,
                seconds=round(time.perf_counter() - start, 1))
  result_files.write_json(args.out, result)
  plot = pathlib.Path(args.out).with_suffix(".png")
  plots.continuation_vs_ratio(cont["policies"], plot, title=f"KIVI storages on {model.name} after {length} tokens",
                              family=lambda n: "+".join(n.split("+")[1:]) or "plain codes")   # lines: 2 to 4 bits
  print(real_eval.continuation_table(cont["policies"]))
  print(f"wrote {args.out} and {plot} in {result['seconds']:.0f} s")
  return result


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
