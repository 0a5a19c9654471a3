"""Per-layer bits chosen from measured sensitivity on SmolLM2-135M-Instruct, against fixed widths at equal bytes.

    python experiments/bits_smollm2.py --out experiments/results/bits_smollm2_4k.json
    python experiments/bits_smollm2.py --tiny --out /tmp/bits.json      # random 2-layer model, seconds

akv.bit_allocation.plan_bits calibrates on one play's first `length` tokens (a play that is not evaluated): every
layer compressed at each of `widths` (2, 3, 4 and 8 bits), the attention-output error of its last 32 prompt
queries and the bytes held. Two recipes, each at one byte budget:
  kivi   KIVI storage of every token (kivi2's groups and 128-token bf16 window) at kivi3's measured ratio (or
         `kivi_target` x): the plan against uniform kivi3 at the same bytes, against `kivi_by_index` (the first
         layers at 4 bits, the rest at 2, as many at 4 bits as the same budget holds: a split that knows nothing
         of the layers) and against kivi2 and kivi4;
  hybrid hybrid_8x's selection at the keep its 8x target solves on this model, bits planned at 8x, against
         hybrid_8x itself (layer 0 at 4 bits by rule, the rest at 2).
Each is measured by the continuation NLL of `plays` after `length` tokens (experiments/real_eval.continuation:
prefill, compress, teacher-force 512 tokens through decode_step) against the full cache, with the bytes held.
Writes one JSON file: the plans (widths, errors, bytes) and the continuation rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402

import akv_jax as akv  # noqa: E402
from akv_jax import models  # noqa: E402
from experiments import real_eval, result_files  # noqa: E402


def calibrate(model: real_eval.RealModel, play: str, length: int):
  """Per-layer DenseKV (in the model's cache dtype) and observation queries of one play's first `length` tokens."""
  tokens = real_eval.play_tokens(model, [play], length)
  lengths = jnp.full((1,), length, jnp.int32)
  return models.observe_prompt(model.config, model.params, tokens, lengths, window=32)


def by_index(plan: akv.bit_allocation.BitPlan, name: str) -> akv.Policy:
  """The first n layers at 4 bits and the rest at 2, n the most the plan's budget holds (from its measured bytes)."""
  c2, c4 = plan.candidates.index(2), plan.candidates.index(4)
  num_layers = len(plan.widths)
  n = max(i for i in range(num_layers + 1)
          if plan.layer_bytes[:i, c4].sum() + plan.layer_bytes[i:, c2].sum() <= plan.budget_bytes)
  return dataclasses.replace(plan.policy, name=name, layer_bits=(4,) * n + (2,) * (num_layers - n))


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="experiments/results/bits_smollm2_4k.json")
  parser.add_argument("--length", type=int, default=4096)
  parser.add_argument("--calibration_play", default="othello")
  parser.add_argument("--plays", default="hamlet,macbeth,the-tempest")
  parser.add_argument("--kivi_target", type=float, default=None, help="default: kivi3's measured ratio")
  parser.add_argument("--widths", default="2,3,4,8", help="candidate bits per layer")
  parser.add_argument("--tokens", type=int, default=512, help="continuation tokens")
  parser.add_argument("--tiny", action="store_true", help="random 2-layer model at 512 tokens (a smoke run)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  model = real_eval.load_smollm2()
  length, tokens, plays = args.length, args.tokens, args.plays.split(",")
  widths = tuple(int(w) for w in args.widths.split(","))
  hybrid_target = 8.0
  if args.tiny:   # 512 tokens: a 128-token bf16 window leaves no room for 8x
    model, length, tokens, plays = real_eval.random_model(model), 512, 16, plays[:1]
    hybrid_target = 1.6
  kivi2, kivi3 = akv.presets.get("kivi2"), akv.presets.get("kivi3")
  kivi_target = args.kivi_target or akv.ratios.measured_ratio(kivi3, real_eval.cache_shape(model, length))
  kvs, qs = calibrate(model, args.calibration_play, length)
  kivi_plan = akv.bit_allocation.plan_bits(kivi2, kvs, qs, target=kivi_target, widths=widths)
  hybrid = (akv.presets.fixed("hybrid_8x") if args.tiny else
            akv.ratios.resolve_target(akv.presets.get("hybrid_8x"), real_eval.cache_shape(model, length)))
  hybrid_plan = akv.bit_allocation.plan_bits(hybrid, kvs, qs, target=hybrid_target, widths=widths)
  policies = [akv.presets.get("full"), kivi2, kivi3, akv.presets.get("kivi4"),
              dataclasses.replace(kivi_plan.policy, name=f"kivi_planned@{kivi_target:.2f}x"),
              by_index(kivi_plan, f"kivi_by_index@{kivi_target:.2f}x"),
              dataclasses.replace(hybrid, name="hybrid_8x"),
              dataclasses.replace(hybrid_plan.policy, name=f"hybrid_planned@{hybrid_target:g}x")]
  for p in policies:
    print(f"{p.name:24s} layer_bits={p.layer_bits}", flush=True)
  cont = real_eval.continuation(model, policies, plays, length, tokens, progress=not args.no_progress)
  result = dict(command=result_files.command_line("bits_smollm2.py", argv), machine=result_files.machine(),
                model=model.name, length=length, calibration_play=args.calibration_play,
                plans=dict(kivi=kivi_plan.to_dict(), hybrid=hybrid_plan.to_dict()),
                policies={p.name: p.to_dict() for p in policies}, continuation=cont,
                seconds=round(time.perf_counter() - start, 1))
  result_files.write_json(args.out, result)
  print(real_eval.continuation_table(cont["policies"]))
  print(f"wrote {args.out} in {result['seconds']:.0f} s")
  return result


if __name__ == "__main__":
  try:
    main()
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
