"""Quality of compression policies on a KV artifact: bytes held, reconstruction error and attention fidelity.

Usage:
  python experiments/synthetic/run_quality_benchmarks.py ARTIFACT [--policies full,kivi2,...] [--out results.json]

ARTIFACT is a .npz file or an orbax directory written by experiments/synthetic/synthetic.py (see its docstring for the
layout: k, v [L, B, K, S, H], q_obs [L, B, N, W, H], q_test [L, B, N, T, H], lengths i32[B]).

For every policy and layer: the layer's K/V are cast to bfloat16 (ratios are against bf16 dense), compressed with
the layer's observation queries, and measured with `akv.layer_stats` (key/value relative error of the kept tokens,
attention mass the test queries put on kept tokens and on the bf16 guard bands) and with the attention output of
each test query, as one token [B, N, H] attending over the whole prompt:

  out_err = mean over t of ||attend(q_t, ckv) - dense_attention(q_t, k, v, lengths)|| / ||dense_attention(...)||

The compression ratio of a policy is over all layers: sum of bf16 dense bytes / sum of `akv.nbytes` held.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import akv_jax as akv
from experiments import result_files
from experiments.synthetic import synthetic

# Per-layer figures, in table order: (JSON key, table header, format).
COLUMNS = (
    ("compression_ratio", "ratio", "{:8.2f}"),
    ("key_rel_error", "key err", "{:8.4f}"),
    ("value_rel_error", "value err", "{:9.4f}"),
    ("attention_retained", "retained", "{:8.4f}"),
    ("guard_mass", "guard", "{:7.4f}"),
    ("output_rel_error", "out err", "{:8.4f}"),
)
# Keys every per-layer entry has (it also keeps anything else layer_stats reports).
LAYER_KEYS = ("bytes", "dense_bf16_bytes", "compression_ratio", "kept_tokens", "key_bits", "value_bits",
              "key_rel_error", "value_rel_error", "attention_retained", "guard_mass", "output_rel_error",
              "output_rel_error_max")
MEAN_KEYS = ("kept_tokens", "key_rel_error", "value_rel_error", "attention_retained", "guard_mass",
             "output_rel_error")


@jax.jit
def _output_errors(q_test: jax.Array, ckv: akv.CompressedKV, kv: akv.DenseKV) -> jax.Array:
  """f32[T] relative error of each test query's attention output; q_test: [B, N, T, H]."""

  def one(q):  # q: [B, N, H], one token after the prompt: it sees every prompt token.
    out = akv.attend(q, ckv).astype(jnp.float32)
    ref = akv.dense_attention(q, kv.k, kv.v, kv.lengths).astype(jnp.float32)
    return jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)

  return jax.vmap(one, in_axes=2)(q_test)


def resolve_policies(policies: Sequence[str | akv.Policy] | str) -> list[akv.Policy]:
  """Policies from preset names (a comma-separated string or a list) or Policy objects; unknown names raise."""
  if isinstance(policies, str):
    policies = [p.strip() for p in policies.split(",") if p.strip()]
  if not policies:
    raise ValueError("no policies given")
  out = [p if isinstance(p, akv.Policy) else akv.presets.get(p) for p in policies]
  names = [p.name for p in out]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise ValueError(f"policy names must be unique, got {dupes} more than once")
  return out


def _needs_model(policy: akv.Policy) -> bool:
  """The scorer reads something only a model has: its rotary frequencies or a second model pass (KVzip)."""
  needs = policy.needs(1)
  return needs.rope or needs.reconstruction is not None


def _check_fits(policy: akv.Policy, artifact: dict[str, Any]) -> None:
  """Raises ValueError, naming the policy, when the artifact cannot feed it (before any compilation)."""
  w = artifact["q_obs"].shape[3]
  num_layers, s = artifact["k"].shape[0], artifact["k"].shape[3]
  needs = policy.needs(s)
  # An observation window must be whole (SnapKV family); TOVA reads the last query, H2O as many as there are.
  if needs.votes == "window" and w < needs.queries:
    raise ValueError(f"policy {policy.name!r} scores with window={needs.queries} observation queries, but the "
                     f"artifact holds W={w}; regenerate it with window >= {needs.queries}")
  if _needs_model(policy):
    raise ValueError(f"policy {policy.name!r} (selection={policy.selection!r}) needs a model (its rotary "
                     "frequencies or a model pass), which a synthetic artifact does not have; evaluate it on a "
                     "model (experiments/run_real.py)")
  if policy.budget.pooled_layers:
    raise ValueError(f"policy {policy.name!r} splits its budget across layers (budget={policy.budget.name!r}), "
                     "but this runner measures one layer at a time: run it on a model (experiments/run_real.py)")
  try:
    policy = akv.ratios.resolve_target(policy, akv.ratios.CacheShape(
        s=s, num_layers=num_layers, kv_heads=artifact["k"].shape[2], head_dim=artifact["k"].shape[4]))
    for layer in range(num_layers):
      policy.layout(s, layer, num_layers)
  except ValueError as e:
    raise ValueError(f"policy {policy.name!r} does not fit the artifact (S={s}, {num_layers} layers): "
                     f"{e}") from e


def evaluate_policy(artifact: dict[str, Any], policy: akv.Policy, *, progress: tqdm | None = None) -> dict:
  """Compresses every layer of `artifact` with `policy` and measures it; returns the policy's JSON entry."""
  _check_fits(policy, artifact)
  num_layers = artifact["k"].shape[0]
  lengths = jnp.asarray(artifact["lengths"], jnp.int32)
  start = time.perf_counter()
  layers = []
  for layer in range(num_layers):
    kv = akv.DenseKV(k=jnp.asarray(artifact["k"][layer], jnp.bfloat16),
                     v=jnp.asarray(artifact["v"][layer], jnp.bfloat16), lengths=lengths)
    q_obs = jnp.asarray(artifact["q_obs"][layer], jnp.float32)
    q_test = jnp.asarray(artifact["q_test"][layer], jnp.float32)
    try:
      ckv = akv.compress(kv, policy, queries=q_obs, layer=layer, num_layers=num_layers)
    except ValueError as e:
      raise ValueError(f"policy {policy.name!r}, layer {layer}: {e}") from e
    stats = jax.device_get(akv.layer_stats(kv, ckv, q_test))
    entry = {key: float(val) for key, val in stats.items()}
    entry["bytes"] = akv.nbytes(ckv)  # exact integer, not the f32 copy in stats
    entry["dense_bf16_bytes"] = akv.dense_bf16_bytes(kv)
    entry["compression_ratio"] = entry["dense_bf16_bytes"] / entry["bytes"]
    errs = np.asarray(_output_errors(q_test, ckv, kv))
    entry["output_rel_error"] = float(errs.mean())
    entry["output_rel_error_max"] = float(errs.max())
    layers.append({"layer": layer, **entry})
    if progress is not None:
      progress.update(1)
  total_bytes = sum(x["bytes"] for x in layers)
  dense_bytes = sum(x["dense_bf16_bytes"] for x in layers)
  return {
      "name": policy.name,
      "policy": policy.to_dict(),
      "bytes": total_bytes,
      "dense_bf16_bytes": dense_bytes,
      "compression_ratio": dense_bytes / total_bytes,
      "mean": {k: float(np.mean([x[k] for x in layers])) for k in MEAN_KEYS},
      "layers": layers,
      "seconds": time.perf_counter() - start,  # includes compilation
  }


def run(artifact: dict[str, Any], policies: Sequence[str | akv.Policy] | str, *,
        artifact_path: str | None = None, show_progress: bool = True) -> dict:
  """Evaluates `policies` on `artifact`; returns {"artifact", "machine", "policies": {name: entry}}."""
  resolved = resolve_policies(policies)
  for p in resolved:  # fail before spending minutes on the policies before it
    _check_fits(p, artifact)
  num_layers = artifact["k"].shape[0]
  results = {"artifact": {"path": artifact_path, "shape": synthetic.describe(artifact), "meta": artifact["meta"]},
             "machine": result_files.machine(), "policies": {}}
  with tqdm(total=len(resolved) * num_layers, unit="layer", disable=not show_progress, file=sys.stderr) as bar:
    for policy in resolved:
      bar.set_description(policy.name)
      results["policies"][policy.name] = evaluate_policy(artifact, policy, progress=bar)
  return results


def _row_values(entry: dict) -> list[float]:
  return [entry["compression_ratio"], *(entry["mean"][key] for key, _, _ in COLUMNS[1:])]


def format_table(results: dict) -> str:
  """Plain-text table: one row per policy; errors and masses are means over layers, the ratio over all layers."""
  name_w = max([6, *(len(n) for n in results["policies"])])
  head = f"{'policy':<{name_w}}  " + "  ".join(f"{h:>{len(fmt.format(0.0))}}" for _, h, fmt in COLUMNS)
  lines = [head, "-" * len(head)]
  for name, entry in results["policies"].items():
    cells = [fmt.format(x) for (_, _, fmt), x in zip(COLUMNS, _row_values(entry))]
    lines.append(f"{name:<{name_w}}  " + "  ".join(cells))
  return "\n".join(lines)


def markdown_table(results: dict) -> str:
  """The same table in markdown."""
  lines = ["| policy | " + " | ".join(h for _, h, _ in COLUMNS) + " | seconds |",
           "|---|" + "---:|" * (len(COLUMNS) + 1)]
  for name, entry in results["policies"].items():
    cells = [fmt.format(x).strip() for (_, _, fmt), x in zip(COLUMNS, _row_values(entry))]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {entry['seconds']:.1f} |")
  return "\n".join(lines)


def markdown_layers(entry: dict) -> str:
  """Per-layer markdown table of one policy."""
  keys = ("compression_ratio", "kept_tokens", "key_bits", "value_bits", "key_rel_error", "value_rel_error",
          "attention_retained", "guard_mass", "output_rel_error")
  lines = ["| layer | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
  for x in entry["layers"]:
    lines.append(f"| {x['layer']} | " + " | ".join(f"{x[k]:.4g}" for k in keys) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("artifact", help=".npz file or orbax directory from experiments/synthetic/synthetic.py")
  parser.add_argument("--policies",
                      default=",".join(n for n in akv.presets.names() if not _needs_model(akv.presets.get(n))
                                       and not akv.presets.get(n).budget.pooled_layers),
                      help="comma-separated preset names (default: every preset that needs no model and is "
                           "measured one layer at a time)")
  parser.add_argument("--out", default=None, help="write results as JSON here")
  parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
  args = parser.parse_args(argv)
  artifact = synthetic.load_artifact(args.artifact)
  print(f"artifact {args.artifact}: {synthetic.describe(artifact)}")
  try:
    results = run(artifact, args.policies, artifact_path=str(args.artifact), show_progress=not args.no_progress)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e
  print(format_table(results))
  results["command"] = result_files.command_line("synthetic/run_quality_benchmarks.py", argv)
  if args.out:
    result_files.write_json(args.out, results)
    print(f"wrote {args.out}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
