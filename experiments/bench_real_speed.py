"""Speed and memory of SmolLM2-135M-Instruct with the full cache and with compressed caches, on this machine.

    python experiments/bench_real_speed.py --out experiments/results/speed_smollm2_cpu.json \
        [--policies full,hybrid_8x,snapkv,kivi2] [--lengths 4096,8192] [--batches 1,4] [--decode_steps 16] [--reps 2]

Each (policy, length, batch) runs in a fresh process, so its peak resident memory (ru_maxrss) is its own: the
model, its prefill and its decoding, nothing left over from another configuration. In that process: a jitted
prefill of `batch` rows of real text (the first `length` tokens of Hamlet) that compresses every layer, timed after
a warm-up call (TTFT, the median of `reps`); then `decode_steps` decode steps, the first a warm-up, the rest timed
together (TPOT) and tokens/s = batch / TPOT. Presets named for a ratio are fitted to it at each length, as the main
job does. Ratios between policies are read from one run of this script, side by side, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def one(policy_name: str, length: int, batch: int, decode_steps: int, reps: int) -> dict:
  """Measures one configuration in this process."""
  import jax.numpy as jnp  # noqa: PLC0415

  from experiments import model_eval, real_eval  # noqa: PLC0415

  model = real_eval.load_smollm2()
  # `length` is the context the run fills: the prompt leaves room for the decoded tokens (8192 is the model's whole
  # context, so "8k" prefills 8192 - decode_steps tokens).
  prompt = min(length, model.config.max_seq_len - decode_steps)
  if prompt < 1:
    raise ValueError(f"decode_steps={decode_steps} leaves no prompt in the model's context {model.config.max_seq_len}")
  policy = real_eval.resolve_policy(policy_name, real_eval.cache_shape(model, prompt), fit_named=True)
  seq = real_eval.play_tokens(model, ["hamlet"], prompt)
  toks = jnp.broadcast_to(seq, (batch, prompt))
  lens = jnp.full((batch,), prompt, jnp.int32)

  t = model_eval.time_prefill_decode(model.config, model.params, toks, lens, policy, decode_steps=decode_steps,
                                     reps=reps)
  ttft, first, tpot, held = t["ttft_ms"], t["first_call_s"], t["tpot_ms"], t["cache_bytes"]
  return dict(policy=policy_name, keep=policy.keep, length=length, prompt_tokens=prompt, batch=batch,
              ttft_ms=round(ttft, 1),
              first_call_s=round(first, 1), tpot_ms=round(tpot, 2), tokens_per_s=round(batch / tpot * 1e3, 2),
              cache_bytes=int(held), dense_bf16_bytes=real_eval.dense_bf16_bytes(model.config, batch, prompt),
              peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _ints(text: str, flag: str) -> list[int]:
  try:
    values = [int(x) for x in text.split(",") if x]
  except ValueError:
    raise SystemExit(f"error: {flag}={text!r} must be comma-separated ints") from None
  if not values or any(v < 1 for v in values):
    raise SystemExit(f"error: {flag}={text!r} must list ints >= 1")
  return values


def main(argv: list[str] | None = None) -> dict:
  from experiments import real_eval, result_files  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="experiments/results/speed_smollm2_cpu.json")
  parser.add_argument("--policies", default="full,hybrid_8x,snapkv,kivi2")
  parser.add_argument("--lengths", default="4096,8192")
  parser.add_argument("--batches", default="1,4")
  parser.add_argument("--decode_steps", type=int, default=16)
  parser.add_argument("--reps", type=int, default=2)
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)   # a child's configuration, as JSON
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(one(**json.loads(args.one))))
    return {}
  policies = [p for p in args.policies.split(",") if p]
  for name in policies:
    try:
      real_eval.resolve_policy(name.partition("@")[0])
    except ValueError as e:
      raise SystemExit(f"error: --policies: {e}") from None
  lengths, batches = _ints(args.lengths, "--lengths"), _ints(args.batches, "--batches")
  if args.decode_steps < 2 or args.reps < 1:
    raise SystemExit(f"error: --decode_steps={args.decode_steps} must be >= 2 and --reps={args.reps} >= 1")
  rows = []
  for length in lengths:
    for batch in batches:
      for name in policies:
        spec = dict(policy_name=name, length=length, batch=batch, decode_steps=args.decode_steps, reps=args.reps)
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              check=False)
        if proc.returncode:
          raise SystemExit(f"error: {spec} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
  for row in rows:   # side by side: each compressed row against the full cache at its length and batch
    base = next((r for r in rows if r["policy"] == "full" and r["length"] == row["length"]
                 and r["batch"] == row["batch"]), None)
    if base is not None:
      row["ttft_vs_full"] = round(row["ttft_ms"] / base["ttft_ms"], 3)
      row["tpot_vs_full"] = round(row["tpot_ms"] / base["tpot_ms"], 3)
  result = dict(command=result_files.command_line("bench_real_speed.py", argv), machine=result_files.machine(),
                rows=rows)
  result_files.write_json(args.out, result)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
