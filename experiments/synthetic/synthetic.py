"""Synthetic KV-cache artifacts with the structure that KV compression methods rely on.

Axis legend: L layers, B batch, K kv heads, N query heads (N = G * K, query head n reads kv head n // G),
S prompt tokens, H head dim, W observation queries, T test queries.

An artifact is a dict

  k, v:     f32[L, B, K, S, H]  post-RoPE keys and values of the prompt (bf16-castable; zero past a row's length)
  lengths:  i32[B]              prompt tokens of each row (right-padded)
  q_obs:    f32[L, B, N, W, H]  the last W prompt queries of each row (positions lengths - W .. lengths - 1)
  q_test:   f32[L, B, N, T, H]  queries of the T tokens that follow the prompt (positions lengths .. lengths + T - 1);
                                each attends over the whole prompt
  meta:     json-able dict: the generating config, sink count, heavy-hitter and outlier positions, head temperatures

Everything is drawn from one numpy Generator seeded by `SyntheticConfig.seed`, so an artifact is a pure function
of its config.

Structure. Work in logit units, logit(t, s) = q_t . k_s / sqrt(H). Each (layer, kv head) has a random orthonormal
basis of R^H split into a sink direction u, a heavy-hitter direction r, 2F positional directions and a content
subspace (the rest). Keys and queries are built from coefficients in that basis, so the logit is a sum of
independent, interpretable terms:

  logit(t, s) = tau * ( sink * [s < Z]                            attention sinks
                      + heavy * a_t * g_s                         long-range heavy hitters
                      + local * mean_f cos(w_f (t - s)) [s >= Z]  local attention (RoPE-like kernel)
                      + content_std * z_t . e_s )                 content noise, ~N(0, content_std^2)

* Attention sinks: the first `n_sink` keys carry a large component along u (and no positional one), and every
  query has a component along u, so every query gives them a large logit wherever it sits. Their values are
  small (`sink_value_scale`), as observed in trained LLMs, so dropping them mostly changes the softmax
  denominator.
* Local attention: keys and queries carry [cos(w_f p), sin(w_f p)] features of their position p with wavelengths
  geometric in [`min_wavelength`, `max_wavelength`]; their dot product is a kernel of t - s that is 1 at distance
  0 and decays (with pseudo-random ripples) as frequencies decorrelate: recent tokens get the most attention.
* Heavy hitters: per row and layer a pool of `n_heavy` positions drawn away from both ends of the prompt (never
  in the last quarter, so they are genuinely long-range); each kv head attends to its own random subset (a
  quarter to all of the pool). A heavy hitter is a short span (1 to 5 tokens, gains 1, 0.6, 0.35 from the
  centre) with a component along r; every query, observation and test alike, has a component along r with a
  per-token gain a_t in [0.5, 1.5]. So the observation window attends to the same tokens the test queries will
  (SnapKV can find them), and the span suits SnapKV's pooling.
* Head variation: every kv head draws its own temperature tau (log-uniform over a `head_spread` range), sink
  and heavy strengths (x0.8 .. x1.25), local strength (x0.6 .. x1.4) and heavy-hitter subset, and each query
  head of a GQA group jitters them by ~10%; some heads are therefore concentrated on a few tokens and others
  diffuse, which is what AdaKV's head-adaptive budgets exploit. tau also ramps with depth (x(1 - layer_ramp)
  at layer 0 to x(1 + layer_ramp) at the last layer: early layers are more diffuse, PyramidKV's premise).
* Outlier key channels: `n_outlier_channels` fixed channels per (layer, kv head), in the channel basis, have a
  large constant offset (`outlier_scale` x U(0.7, 1.3), random sign; a regular channel's std is about 1 to 2)
  plus extra spread (std 1.5). The offset shifts all logits of a query equally (softmax-invariant) but dominates
  per-token quantization ranges, which is why KIVI quantizes keys per channel.
* Values: a per-(layer, kv head) mean vector (`value_mean` times the token spread, as trained models' values
  share a common component) plus i.i.d. normal noise, times a per-channel scale exp(N(0, 0.3^2)); no outlier
  channels (KIVI's observation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any

import numpy as np

ARRAY_KEYS = ("k", "v", "lengths", "q_obs", "q_test")
FORMAT_VERSION = 1
# Key magnitude along u, r and the positional directions. Keys carry the structure (sink and heavy-hitter keys
# are distinctive in trained models) and queries stay moderate: |q| / sqrt(H) sets how many logits a key
# quantization error costs, and with queries carrying the structure instead, 4-bit keys already lost more
# attention fidelity than 4-bit values, against what KIVI and KVQuant measure on real models.
_B = 12.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
  """Shapes and structure of a synthetic artifact. Strengths are in logit units (q . k / sqrt(H))."""

  # Shapes.
  seq_len: int = 4096          # S
  layers: int = 4              # L
  batch: int = 1               # B
  kv_heads: int = 4            # K
  q_heads: int = 16            # N, a multiple of K
  head_dim: int = 128          # H
  window: int = 32             # W observation queries
  test_queries: int = 8        # T
  seed: int = 0
  # Ragged batches: row lengths uniform in [min_length_frac * S, S]; the first row always has length S.
  min_length_frac: float = 1.0
  # Structure.
  n_sink: int = 4
  sink_logit: float = 9.0
  sink_value_scale: float = 0.1
  value_mean: float = 1.0      # per-head mean value vector, in units of the per-token spread
  n_heavy: int = 24
  heavy_logit: float = 6.5
  local_logit: float = 10.0
  min_wavelength: float = 8.0
  max_wavelength: float = 2048.0
  content_std: float = 1.0
  head_spread: float = 2.0     # max / min kv-head temperature within a layer
  layer_ramp: float = 0.2
  n_outlier_channels: int = 4
  outlier_scale: float = 10.0

  def __post_init__(self):
    for field in ("seq_len", "layers", "batch", "kv_heads", "q_heads", "head_dim", "window", "test_queries"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 1")
    for field in ("n_sink", "n_heavy", "n_outlier_channels", "seed"):
      if getattr(self, field) < 0:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 0")
    if self.q_heads % self.kv_heads:
      raise ValueError(f"q_heads={self.q_heads} must be a multiple of kv_heads={self.kv_heads} (GQA)")
    if self.head_dim < 2 + 2 * self.num_frequencies + 4:
      raise ValueError(f"head_dim={self.head_dim} is too small: need 2 + 2 * {self.num_frequencies} positional "
                       "+ 4 content dims")
    if self.n_outlier_channels > self.head_dim // 4:
      raise ValueError(f"n_outlier_channels={self.n_outlier_channels} must be <= head_dim / 4 = "
                       f"{self.head_dim // 4}")
    if not 0.0 < self.min_length_frac <= 1.0:
      raise ValueError(f"min_length_frac={self.min_length_frac} must be in (0, 1]")
    if self.min_length < self.window or self.min_length < 4 * (self.n_sink + 1):
      raise ValueError(f"the shortest row ({self.min_length} tokens from seq_len={self.seq_len}, "
                       f"min_length_frac={self.min_length_frac}) must hold the window={self.window} and "
                       f"4 * (n_sink + 1) = {4 * (self.n_sink + 1)} tokens")
    if not 0.0 < self.min_wavelength <= self.max_wavelength:
      raise ValueError(f"need 0 < min_wavelength={self.min_wavelength} <= max_wavelength={self.max_wavelength}")
    if self.head_spread < 1.0:
      raise ValueError(f"head_spread={self.head_spread} must be >= 1")
    if not 0.0 <= self.layer_ramp < 1.0:
      raise ValueError(f"layer_ramp={self.layer_ramp} must be in [0, 1)")
    for field in ("sink_logit", "heavy_logit", "local_logit", "content_std", "sink_value_scale", "value_mean",
                  "outlier_scale"):
      if getattr(self, field) < 0:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 0")

  @property
  def num_frequencies(self) -> int:
    """F: positional frequencies (2F positional dims, 3/4 of those left after u and r).

    The kernel's far-field ripple has std 1 / sqrt(2F) of its peak: with fewer frequencies it adds a
    pseudo-random logit of several units to every distant token and drowns the other structure at small H.
    """
    return max(2, 3 * (self.head_dim - 2) // 8)

  @property
  def min_length(self) -> int:
    return max(1, math.ceil(self.min_length_frac * self.seq_len))


def field_names() -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(SyntheticConfig))


def config_from_dict(d: dict[str, Any], *, where: str = "artifact") -> SyntheticConfig:
  """SyntheticConfig from a plain dict (YAML, CLI), with errors that name the offending field and value."""
  fields = {f.name: f for f in dataclasses.fields(SyntheticConfig)}
  kwargs = {}
  for name, value in d.items():
    if name not in fields:
      raise ValueError(f"unknown config field {where}.{name} (value {value!r}); known fields: "
                       f"{', '.join(fields)}")
    want = type(getattr(SyntheticConfig(), name))
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
      raise ValueError(f"config field {where}.{name} must be an integer, got {value!r}")
    if want is float:
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config field {where}.{name} must be a number, got {value!r}")
      value = float(value)
    kwargs[name] = value
  return SyntheticConfig(**kwargs)


def _positional(pos: np.ndarray, cfg: SyntheticConfig) -> np.ndarray:
  """f64[..., 2F] unit-norm [cos, sin] features of integer positions."""
  f = cfg.num_frequencies
  wavelengths = np.geomspace(cfg.min_wavelength, cfg.max_wavelength, f)
  angle = pos[..., None] * (2 * np.pi / wavelengths)
  return np.concatenate([np.cos(angle), np.sin(angle)], axis=-1) / np.sqrt(f)


def _heavy_spans(rng: np.random.Generator, centres: np.ndarray, length: int, n_sink: int) -> np.ndarray:
  """f64[length] heavy-hitter gain per position: spans of 1..5 tokens around each centre."""
  gain = np.zeros(length)
  shape = (1.0, 0.6, 0.35)
  for c in centres:
    radius = int(rng.integers(0, 3))
    strength = rng.uniform(0.8, 1.2)
    for d in range(-radius, radius + 1):
      p = c + d
      if n_sink <= p < length:
        gain[p] = max(gain[p], strength * shape[abs(d)])
  return gain


def _layer(rng: np.random.Generator, cfg: SyntheticConfig, layer: int, lengths: np.ndarray):
  """One layer: (k, v [B, K, S, H], q_obs [B, N, W, H], q_test [B, N, T, H], layer meta)."""
  b, kh, n, s, h = cfg.batch, cfg.kv_heads, cfg.q_heads, cfg.seq_len, cfg.head_dim
  g, w, t, z, f2 = n // kh, cfg.window, cfg.test_queries, cfg.n_sink, 2 * cfg.num_frequencies
  # Basis columns (E, the basis coordinate): 0 sink direction u, 1 heavy direction r, 2 .. 2 + 2F positional,
  # the rest content.
  basis, _ = np.linalg.qr(rng.normal(size=(kh, h, h)))                   # [K, H, E]
  dc = h - 2 - f2

  # Per kv head: temperature (log-uniform over head_spread, ramped by depth) and term strengths.
  ramp = 1.0 + cfg.layer_ramp * (2 * layer / (cfg.layers - 1) - 1) if cfg.layers > 1 else 1.0
  tau = ramp * np.exp(rng.uniform(-0.5, 0.5, kh) * np.log(cfg.head_spread))
  # Sinks and heavy hitters vary less than locality: every trained head we know of has sinks.
  sink = cfg.sink_logit * rng.uniform(0.8, 1.25, kh)
  heavy = cfg.heavy_logit * rng.uniform(0.8, 1.25, kh)
  local = cfg.local_logit * rng.uniform(0.6, 1.4, kh)

  pos_s = np.arange(s)
  kpos = _positional(pos_s, cfg)                                          # [S, 2F]
  coef_k = np.zeros((b, kh, s, h))                                       # [B, K, S, E]
  coef_k[..., 0] = rng.normal(0, 0.1, (b, kh, s))
  coef_k[..., :z, 0] += _B * rng.uniform(0.9, 1.1, (b, kh, z))
  coef_k[..., 1] = rng.normal(0, 0.1, (b, kh, s))
  coef_k[..., 2:2 + f2] = _B * kpos
  # Sinks are position-free: the kernel's far-field ripple would otherwise switch a row's sinks on or off by its
  # length (RoPE at position 0 is the identity, and trained models keep sink keys apart from the rest).
  coef_k[..., :z, 2:2 + f2] = 0.0
  coef_k[..., 2 + f2:] = rng.normal(size=(b, kh, s, dc))

  heavy_meta = []
  for row in range(b):
    length = int(lengths[row])
    lo, hi = z + 1, max(z + 2, (3 * length) // 4)
    pool = np.sort(rng.choice(np.arange(lo, hi), size=min(cfg.n_heavy, hi - lo), replace=False))
    row_meta = []
    for head in range(kh):
      m = int(rng.integers(max(1, len(pool) // 4), len(pool) + 1)) if len(pool) else 0
      centres = np.sort(rng.choice(pool, size=m, replace=False)) if m else pool[:0]
      coef_k[row, head, :length, 1] += _B * _heavy_spans(rng, centres, length, z)
      row_meta.append([int(c) for c in centres])
    heavy_meta.append(row_meta)

  k = np.einsum("BKSE,KHE->BKSH", coef_k, basis)
  outliers = np.stack([rng.choice(h, cfg.n_outlier_channels, replace=False) for _ in range(kh)])  # [K, O]
  for head in range(kh):
    c = outliers[head]
    offset = cfg.outlier_scale * rng.choice([-1.0, 1.0], size=len(c)) * rng.uniform(0.7, 1.3, len(c))
    k[:, head][..., c] += offset + 1.5 * rng.normal(size=(b, s, len(c)))
  mean_v = cfg.value_mean * rng.normal(size=(1, kh, 1, h))
  v = (mean_v + rng.normal(size=(b, kh, s, h))) * np.exp(rng.normal(0, 0.3, (1, kh, 1, h)))
  v[:, :, :z] *= cfg.sink_value_scale

  # Query heads: their kv head's strengths, jittered ~10% per query head.
  head_of = np.arange(n) // g
  tau_q, sink_q, heavy_q, local_q = (x[head_of] * np.exp(rng.normal(0, 0.1, n)) for x in (tau, sink, heavy, local))

  def queries(first: np.ndarray, count: int) -> np.ndarray:
    """[B, N, count, H] queries at positions first[b] + 0 .. count - 1."""
    qpos = _positional(first[:, None] + np.arange(count)[None, :], cfg)   # [B, count, 2F]
    coef = np.zeros((b, n, count, h))                                     # [B, N, count, E]
    coef[..., 0] = sink_q[None, :, None] / _B
    coef[..., 1] = heavy_q[None, :, None] / _B * rng.uniform(0.5, 1.5, (b, n, count))
    coef[..., 2:2 + f2] = (local_q[None, :, None, None] / _B) * qpos[:, None]
    coef[..., 2 + f2:] = cfg.content_std * rng.normal(size=(b, n, count, dc)) / np.sqrt(dc)
    coef *= tau_q[None, :, None, None]
    # Logits are q . k / sqrt(H): scale queries up so that they equal coef_q . coef_k.
    return np.sqrt(h) * np.einsum("BNTE,NHE->BNTH", coef, basis[head_of])

  q_obs = queries(lengths - w, w)
  q_test = queries(lengths, t)
  pad = np.arange(s)[None, :] >= lengths[:, None]                          # [B, S]
  k *= ~pad[:, None, :, None]
  v *= ~pad[:, None, :, None]
  meta = {"heavy_hitters": heavy_meta, "outlier_channels": outliers.tolist(), "temperature": tau.tolist()}
  return k, v, q_obs, q_test, meta


def generate(cfg: SyntheticConfig) -> dict[str, Any]:
  """The artifact of `cfg` (see the module docstring); arrays are float32 numpy, lengths int32."""
  rng = np.random.default_rng(cfg.seed)
  lengths = rng.integers(cfg.min_length, cfg.seq_len + 1, cfg.batch)
  lengths[0] = cfg.seq_len  # the cache's capacity S is always used by some row
  parts = [_layer(rng, cfg, layer, lengths) for layer in range(cfg.layers)]
  stack = lambda i: np.stack([p[i] for p in parts]).astype(np.float32)
  meta = {
      "format_version": FORMAT_VERSION,
      "generator": "experiments/synthetic/synthetic.py",
      "config": dataclasses.asdict(cfg),
      "n_sink": cfg.n_sink,
      # Per layer, row and kv head: centres of the heavy-hitter spans.
      "heavy_hitters": [p[4]["heavy_hitters"] for p in parts],
      # Per layer and kv head: the outlier key channels.
      "outlier_channels": [p[4]["outlier_channels"] for p in parts],
      # Per layer and kv head: the temperature tau (larger = more concentrated attention).
      "temperature": [p[4]["temperature"] for p in parts],
  }
  return {"k": stack(0), "v": stack(1), "lengths": lengths.astype(np.int32), "q_obs": stack(2),
          "q_test": stack(3), "meta": meta}


def _check_artifact(artifact: dict[str, Any]) -> None:
  missing = [key for key in (*ARRAY_KEYS, "meta") if key not in artifact]
  if missing:
    raise ValueError(f"artifact is missing {missing}; it needs {(*ARRAY_KEYS, 'meta')}")
  k = artifact["k"]
  if k.ndim != 5 or artifact["v"].shape != k.shape:
    raise ValueError(f"k, v must both be [L, B, K, S, H], got {k.shape} and {artifact['v'].shape}")
  l, b = k.shape[:2]
  if artifact["lengths"].shape != (b,):
    raise ValueError(f"lengths shape {artifact['lengths'].shape} must be ({b},)")
  for key in ("q_obs", "q_test"):
    q = artifact[key]
    if q.ndim != 5 or q.shape[:2] != (l, b) or q.shape[-1] != k.shape[-1] or q.shape[2] % k.shape[2]:
      raise ValueError(f"{key} must be [L, B, N, T, H] = [{l}, {b}, N, T, {k.shape[-1]}] with N a multiple of "
                       f"K={k.shape[2]}, got {q.shape}")


def save_artifact(path: str | os.PathLike, artifact: dict[str, Any], *, dtype: str = "float32") -> None:
  """Writes an artifact to `path`: a .npz file, or else an orbax-checkpoint directory (overwritten).

  Args:
    path: "*.npz" for numpy (always float32: npz cannot hold bfloat16), anything else for orbax.
    artifact: dict as returned by `generate`.
    dtype: "float32" or "bfloat16", the storage type of k, v, q_obs and q_test in an orbax checkpoint.
  """
  _check_artifact(artifact)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r} must be 'float32' or 'bfloat16'")
  path = pathlib.Path(path)
  arrays = {key: np.asarray(artifact[key]) for key in ARRAY_KEYS}
  if path.suffix == ".npz":
    if dtype != "float32":
      raise ValueError(f"dtype={dtype!r}: .npz cannot hold bfloat16; save to an orbax directory instead")
    floats = {key: x.astype(np.float32) if key != "lengths" else x for key, x in arrays.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Uncompressed: random floats do not compress, and savez_compressed is ~10x slower.
    np.savez(path, meta_json=np.asarray(json.dumps(artifact["meta"])), **floats)
    return
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  store = jnp.bfloat16 if dtype == "bfloat16" else np.float32
  tree = {key: (x if key == "lengths" else np.asarray(x).astype(store)) for key, x in arrays.items()}
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(path.absolute(), args=ocp.args.Composite(arrays=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(artifact["meta"])), force=True)


def load_artifact(path: str | os.PathLike) -> dict[str, Any]:
  """Reads an artifact written by `save_artifact`; arrays come back as numpy in their stored dtype."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no artifact at {str(path)!r}")
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as f:
      artifact = {key: f[key] for key in ARRAY_KEYS}
      artifact["meta"] = json.loads(str(f["meta_json"]))
  else:
    import orbax.checkpoint as ocp
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
      restored = ckptr.restore(path.absolute(), args=ocp.args.Composite(arrays=ocp.args.StandardRestore(),
                                                                        meta=ocp.args.JsonRestore()))
    artifact = {key: np.asarray(restored["arrays"][key]) for key in ARRAY_KEYS}
    artifact["meta"] = restored["meta"]
  _check_artifact(artifact)
  return artifact


def describe(artifact: dict[str, Any]) -> str:
  l, b, kh, s, h = artifact["k"].shape
  n, w, t = artifact["q_obs"].shape[2], artifact["q_obs"].shape[3], artifact["q_test"].shape[3]
  return (f"L={l} B={b} K={kh} N={n} S={s} H={h} W={w} T={t} "
          f"lengths={artifact['lengths'].tolist()} dtype={artifact['k'].dtype}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, help="PATH.npz, or a directory for an orbax checkpoint")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="storage dtype of an orbax checkpoint (npz is always float32)")
  for f in dataclasses.fields(SyntheticConfig):
    default = getattr(SyntheticConfig(), f.name)
    parser.add_argument(f"--{f.name}", type=type(default), default=default, help=f"default {default}")
  args = parser.parse_args(argv)
  try:
    cfg = SyntheticConfig(**{name: getattr(args, name) for name in field_names()})
  except ValueError as e:
    parser.error(str(e))
  artifact = generate(cfg)
  save_artifact(args.out, artifact, dtype=args.dtype)
  print(f"wrote {args.out}: {describe(artifact)}")
  return artifact


if __name__ == "__main__":
  main(sys.argv[1:])
