"""Llama-family model configuration and rotary position embeddings (with Llama-3 frequency scaling)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
  """Llama-3 rope scaling: long wavelengths stretched by `factor`, short ones kept, a smooth band between."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f"rope scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
  """A Llama-family decoder. Frozen and hashable: a static argument of every jitted model function.

  Attributes (axis names in parentheses):
    vocab_size (V), hidden_size (D), intermediate_size (F), num_layers (L), num_heads (N), num_kv_heads (K),
    head_dim (H; default D / N), rope_theta, rope_scaling (None or Llama-3 RopeScaling), rms_norm_eps,
    tie_embeddings (the LM head reuses the embedding), max_seq_len (the longest prompt plus generation a cache
    is built for), dtype (activations and parameters: "float32" or "bfloat16").
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_seq_len: int = 8192
  dtype: str = "float32"
  kv_dtype: str | None = None

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "max_seq_len"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 1")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                       "give head_dim")
    if self.hd % 2:
      raise ValueError(f"head_dim={self.hd} must be even for rotary embeddings")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
    if self.kv_dtype not in (None, "float32", "bfloat16"):
      raise ValueError(f"kv_dtype={self.kv_dtype!r} must be None, 'float32' or 'bfloat16'")

  @property
  def hd(self) -> int:
    """H, the head dim."""
    return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_heads

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def kv_jnp_dtype(self):
    return jnp.dtype(self.kv_dtype or self.dtype)


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """f32[H/2] rotary inverse frequencies, Llama-3 scaled when config.rope_scaling is set."""
  h = config.hd
  inv = 1.0 / (config.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h))
  sc = config.rope_scaling
  if sc is None:
    return inv.astype(np.float32)
  low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
  high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / sc.factor, inv)
  smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
      sc.high_freq_factor - sc.low_freq_factor)
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, config: LlamaConfig) -> jax.Array:
  """Rotates x [B, T, N, H] at positions i32[B, T] (the half-split convention of Hugging Face checkpoints)."""
  inv = jnp.asarray(inverse_frequencies(config))
  angles = positions.astype(jnp.float32)[..., None] * inv                  # [B, T, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
