"""What every preset does on fixed inputs, recorded so that a redesign of the method layer can prove it changed
nothing: the arrays each preset's compressed cache holds after prefill and after decode appends, attention outputs
over it, and the greedy tokens of the shipped model.

    python tests/library/behaviour/record.py            # rewrites tests/library/behaviour/presets.npz
    python tests/library/behaviour/record.py --check    # compares against it (tests/library/test_behaviour.py does the same)

Keys are "<preset>/<stage>/<leaf path>" with the leaf path written by `jax.tree_util.keystr`, so a renamed field
shows up as a missing key, named.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import akv_jax as akv  # noqa: E402
from akv_jax import models  # noqa: E402

RECORD = pathlib.Path(__file__).with_name("presets.npz")
# Small enough to run in seconds, large enough that every preset selects, quantizes whole groups and flushes:
# B=2 rows (one ragged), K=2 kv heads of G=2 query heads, S=192, H=32; layers 0 and 2 of 4 (guard layer and
# pyramid budgets differ); 40 appended tokens (more than one key group).
B, K, G, S, H, LAYERS, STEPS = 2, 2, 2, 192, 32, 4, 40
LENGTHS = (192, 151)
# The presets that existed when the record was made; presets added later are not part of it.
PRESETS = ("full", "streaming", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "knorm", "kivi2", "kivi4",
           "hybrid_5x", "hybrid_8x", "hybrid_12x")


def _tune(policy: akv.Policy) -> akv.Policy:
  """A preset scaled to S=192: the same recipe (a ratio preset at its fixed keep: no byte target is reachable
  at S=192) with guard bands and groups that fit."""
  return dataclasses.replace(policy.with_target(None), recent=min(policy.recent, 48), key_group=16, value_group=16)


def _leaves(prefix: str, tree) -> dict[str, np.ndarray]:
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def _inputs():
  keys = jax.random.split(jax.random.key(20261202), 5)
  k = jax.random.normal(keys[0], (B, K, S, H), jnp.float32).astype(jnp.bfloat16)
  v = jax.random.normal(keys[1], (B, K, S, H), jnp.float32).astype(jnp.bfloat16)
  q_obs = jax.random.normal(keys[2], (B, K * G, S, H), jnp.float32)
  new = jax.random.normal(keys[3], (STEPS, 3, B, K * G, H), jnp.float32)
  q = jax.random.normal(keys[4], (B, K * G, H), jnp.float32)
  kv = akv.DenseKV(k=k, v=v, lengths=jnp.array(LENGTHS, jnp.int32))
  return kv, q_obs, new, q


def _observations(policy: akv.Policy, q_obs) -> dict:
  """The observation queries the preset reads: each row's last T valid queries (the ragged row's end at its
  length; slots before position 0 are masked by the scorers)."""
  t = {"snapkv": policy.window, "tova": 1, "h2o": S}.get(policy.selection)
  if t is None:
    return {}
  idx = jnp.clip(jnp.array(LENGTHS)[:, None] - t + jnp.arange(t)[None, :], 0, S - 1)
  return dict(queries=jnp.take_along_axis(q_obs, idx[:, None, :, None], axis=2))


def cache_behaviour() -> dict[str, np.ndarray]:
  kv, q_obs, new, q = _inputs()
  out = {}
  for name in PRESETS:
    policy = _tune(akv.presets.get(name))
    for layer in (0, 2):
      ckv = akv.compress(kv, policy, layer=layer, num_layers=LAYERS, reserve=STEPS,
                         **_observations(policy, q_obs))
      tag = f"{name}/layer{layer}"
      out |= _leaves(f"{tag}/prefill", ckv)
      out[f"{tag}/prefill/attend"] = np.asarray(akv.attend(q, ckv))
      out[f"{tag}/prefill/decompressed_positions"] = np.asarray(akv.decompress(ckv).positions)
      for step in range(STEPS):
        qt, kt, vt = new[step]
        ckv = akv.append(ckv, kt[:, ::G].astype(jnp.bfloat16), vt[:, ::G].astype(jnp.bfloat16), policy)
        if policy.decode.accumulates:
          _, probs = akv.attend(qt, ckv, return_probs=True)
          ckv = akv.observe(ckv, probs, policy)
      out |= _leaves(f"{tag}/decode", ckv)
      out[f"{tag}/decode/attend"] = np.asarray(akv.attend(q, ckv))
  return out


def model_behaviour() -> dict[str, np.ndarray]:
  config, params = models.load_default()
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(4, config.vocab_size, (2, 160)), jnp.int32)
  lengths = jnp.array([160, 131], jnp.int32)
  out = {}
  for name in PRESETS:
    policy = _tune(akv.presets.get(name))
    new, counts, _ = models.generate(config, params, tokens, lengths, policy, 12)
    out[f"{name}/model/tokens"] = np.asarray(new)
    out[f"{name}/model/counts"] = np.asarray(counts)
  return out


def record() -> dict[str, np.ndarray]:
  return cache_behaviour() | model_behaviour()


def compare(now: dict[str, np.ndarray], then: dict[str, np.ndarray], *, rtol: float = 0.0) -> list[str]:
  """Differences between two records: missing or extra keys, shapes, dtypes or elements.

  Integers (positions, fills, codes, tokens) must be equal. Floats must be bit-identical when rtol is 0; rtol > 0
  allows float arrays to differ by that fraction of their largest magnitude (another CPU may order an f32
  reduction differently).
  """
  problems = [f"missing: {k}" for k in sorted(then.keys() - now.keys())]
  problems += [f"new: {k}" for k in sorted(now.keys() - then.keys())]
  for k in sorted(then.keys() & now.keys()):
    a, b = now[k], then[k]
    if a.shape != b.shape or a.dtype != b.dtype:
      problems.append(f"{k}: {a.dtype}{list(a.shape)} != recorded {b.dtype}{list(b.shape)}")
    elif not _close(a, b, rtol):
      diff = np.argwhere(a != b)
      problems.append(f"{k}: {len(diff)} of {a.size} elements differ, first at {diff[0].tolist()}")
  return problems


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
  if a.dtype.kind != "f" or rtol == 0.0:
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
  scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
  return bool(np.all(np.isnan(a) == np.isnan(b))) and float(np.nanmax(np.abs(a - b), initial=0.0)) <= rtol * scale


# Leaves that moved since the record was made, each a named difference of the redesign: recorded path suffix ->
# path now. H2O's accumulated attention left CompressedKV for its decode rule's state (same values).
RENAMED = {".scores": ".state.scores"}


def _renamed(key: str) -> str:
  for old, new in RENAMED.items():
    if key.endswith(old):
      return key[:-len(old)] + new
  return key


def load() -> dict[str, np.ndarray]:
  """The record, with moved leaves under their paths of today (RENAMED)."""
  with np.load(RECORD, allow_pickle=False) as f:
    return {_renamed(k): f[k] for k in f.files}


def _storable(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """bf16 is not an npz dtype: stored as its uint16 bits (compared the same way)."""
  return {k: (v.view(np.uint16) if v.dtype == jnp.bfloat16 else v) for k, v in d.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="compare against the record instead of writing it")
  args = parser.parse_args(argv)
  now = _storable(record())
  if args.check:
    problems = compare(now, load())
    print("\n".join(problems) or f"all {len(now)} arrays identical to {RECORD.name}")
    return 1 if problems else 0
  np.savez_compressed(RECORD, **now)
  print(f"wrote {len(now)} arrays to {RECORD}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
