"""Causal GQA prefill attention that also returns SnapKV / H2O token scores, as Pallas kernels (Triton backend).

Axis legend: B batch, T query length (= key length S in prefill), N query heads, K kv heads, G = N / K query heads
per kv head, H head dim, W observation window, Wp = W padded to a power of 2 >= 16.

Two passes, neither of which ever holds a T x T matrix:

1. `_attention_kernel`, a flash-attention forward over (query block, row, query head): online softmax in f32 with
   exp2 and a log2(e) prescale, key blocks above the causal diagonal and past the row's length skipped. Besides o it
   writes each query row's base-2 log-sum-exp, lse2 = m + log2(l), so that 2^(q.k * scale * log2(e) - lse2) is that
   row's softmax probability.
2. `_scores_kernel`, over (key block, row, kv head): replays the queries that vote (the window's, or all of them for
   H2O) against one key block, turns q.k into probabilities with lse2, and sums them over queries and the G query
   heads. Each program owns its key block of the output, so no atomics are needed.

Triton does not mask blocks that overhang the array, so every load or store that may pass T or a row's length goes
through `_load` / `_store` with a mask; whole-T blocks are used and sliced with pl.ds inside the kernels. These two
helpers and `plgpu.CompilerParams` are the only Triton-specific calls (a port to Mosaic GPU touches them only).

This module imports plain jax only (not akv_jax), so it is testable alone.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dots import dot_nn, dot_nt

# Finite, so that a fully masked block gives exp2(MASK - m) = 0 instead of the NaN of -inf - -inf.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2_E = math.log2(math.e)
_MIN_DOT = 16  # Triton dots need both operand dims >= 16.


# ---------------------------------------------------------------------------------------------- Triton helpers


def _load(ref, mask):
  """Masked load; masked-off elements read as 0 so that NaN in padding cannot reach a dot."""
  return plgpu.load(ref, mask=mask, other=0)


def _store(ref, val, mask):
  plgpu.store(ref, val.astype(ref.dtype), mask=mask)


def _cdiv(a, b: int):
  # `//` on traced int32 scalars lowers to floor-division with sign fix-ups; lengths are non-negative, so a plain
  # truncating lax.div is exact and cheaper.
  return lax.div(a + (b - 1), b)


# ---------------------------------------------------------------------------------------------- pass 1


def _attention_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *lse_refs, seq_len: int, block_q: int,
                      block_k: int, qk_scale: float):
  """One query block of one query head of one row.

  Refs:
    lengths_ref: i32[1] this row's valid length.
    q_ref: [T, H] this query head. k_ref, v_ref: [T, H] its kv head.
    o_ref: [T, H] output of this query head (this program writes rows of its block only).
    lse_refs: () or (f32[T] base-2 log-sum-exp of this query head,).
  """
  # Launch the longest (last) query blocks first: causal work grows with the block index, and finishing the heavy
  # programs early balances the tail of the grid.
  qi = pl.num_programs(0) - 1 - pl.program_id(0)
  q0 = qi * block_q
  length = jnp.minimum(lengths_ref[0], seq_len)
  rows = q0 + jnp.arange(block_q, dtype=jnp.int32)
  row_ok = rows < length
  q = _load(q_ref.at[pl.ds(q0, block_q), :], row_ok[:, None])

  def body(kb, carry):
    acc, m, l = carry
    k0 = kb * block_k
    cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
    col_ok = cols < length
    # Padding keys are zeroed on load: a NaN there would survive the mask through p @ v (0 * NaN).
    k = _load(k_ref.at[pl.ds(k0, block_k), :], col_ok[:, None])
    v = _load(v_ref.at[pl.ds(k0, block_k), :], col_ok[:, None])
    s = dot_nt(q, k) * qk_scale
    # The causal mask alone hides padding keys from valid rows (s <= t < length); padding rows see them, as zeroed
    # keys, which keeps their softmax finite before they are zeroed at the end.
    s = jnp.where(cols[None, :] <= rows[:, None], s, _MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # Key block 0 holds a visible key (position 0) for every row, so after it m is a real logit and masked entries
    # give exp2(MASK - m) = 0 exactly; no separate where on p is needed.
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)

  h = q_ref.shape[-1]
  # Keys past min(last row of the block, length - 1) are invisible to every row of the block; a block of padding
  # queries runs no iteration at all.
  hi = jnp.where(q0 < length, jnp.minimum(q0 + block_q, length), 0)
  init = (jnp.zeros((block_q, h), jnp.float32), jnp.full((block_q,), _MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(0, _cdiv(hi, block_k), body, init)

  l_safe = jnp.where(row_ok, l, 1.0)
  o = jnp.where(row_ok[:, None], acc / l_safe[:, None], 0.0)
  in_array = rows < seq_len
  _store(o_ref.at[pl.ds(q0, block_q), :], o, in_array[:, None])
  if lse_refs:
    lse = jnp.where(row_ok, m + jnp.log2(l_safe), 0.0)
    _store(lse_refs[0].at[pl.ds(q0, block_q)], lse, in_array)


# ---------------------------------------------------------------------------------------------- pass 2


def _scores_kernel(lengths_ref, q_ref, k_ref, lse_ref, *out_refs, seq_len: int, groups: int, window: int,
                   window_padded: int, h2o: bool, block_q: int, block_k: int, qk_scale: float):
  """One key block of one kv head of one row.

  Refs:
    lengths_ref: i32[1] this row's valid length.
    q_ref: [T, G, H] the G query heads of this kv head.
    k_ref: [T, H] this kv head's keys.
    lse_ref: f32[G, T] base-2 log-sum-exp of those query heads (pass 1).
    out_refs: f32[T] window scores if window > 0, then f32[T] H2O scores if h2o.
  """
  k0 = pl.program_id(0) * block_k
  length = jnp.minimum(lengths_ref[0], seq_len)
  cols = k0 + jnp.arange(block_k, dtype=jnp.int32)
  col_ok = cols < length
  k = _load(k_ref.at[pl.ds(k0, block_k), :], col_ok[:, None])
  # Window queries sit at positions length - W .. length - 1; those before 0 do not exist.
  window_start = length - window

  def probs(g, t0, n_rows):
    """f32[n_rows, block_k]: probabilities of queries t0 .. t0 + n_rows - 1 of head g on this key block."""
    rows = t0 + jnp.arange(n_rows, dtype=jnp.int32)
    row_ok = rows < length
    q = _load(q_ref.at[pl.ds(t0, n_rows), g, :], row_ok[:, None])
    lse = _load(lse_ref.at[g, pl.ds(t0, n_rows)], row_ok)
    s = dot_nt(q, k) * qk_scale
    # Valid rows only see keys s <= t < length, so this also zeroes padding keys.
    mask = row_ok[:, None] & (cols[None, :] <= rows[:, None])
    return rows, jnp.where(mask, jnp.exp2(s - lse[:, None]), 0.0)

  zeros = jnp.zeros((block_k,), jnp.float32)
  if h2o:
    # Queries before k0 see none of these keys: start at the query block holding position k0.
    j_lo = lax.div(k0, block_q)
    j_hi = _cdiv(length, block_q)

    def head(g, accs):
      def query_block(j, accs):
        rows, p = probs(g, j * block_q, block_q)
        out = [accs[0] + jnp.sum(p, axis=0)]
        if window:
          out.append(accs[1] + jnp.sum(jnp.where((rows >= window_start)[:, None], p, 0.0), axis=0))
        return tuple(out)

      return lax.fori_loop(j_lo, j_hi, query_block, accs)

    h2o_acc, *win_acc = lax.fori_loop(0, groups, head, (zeros,) * (2 if window else 1))
    accs = [*win_acc, h2o_acc]
  else:
    # Read Wp queries from max(window_start, 0): the rows < length among them are exactly the window (min(W,
    # length) rows), and `probs` masks the Wp - W extra ones as padding queries.
    t0 = jnp.maximum(window_start, 0)

    def head(g, acc):
      _, p = probs(g, t0, window_padded)
      return acc + jnp.sum(p, axis=0)

    # A key block past the row's end gets no vote: skip its G dots. The trip count is int32 arithmetic on
    # purpose: a `where` between two Python ints gave a bound whose type Triton's scf.for rejected (jax 0.11.2).
    accs = [lax.fori_loop(0, groups * (k0 < length).astype(jnp.int32), head, zeros)]

  in_array = cols < seq_len
  for ref, acc in zip(out_refs, accs):
    _store(ref.at[pl.ds(k0, block_k)], acc * (1.0 / groups), in_array)


# ---------------------------------------------------------------------------------------------- wrappers


def _is_pow2(x: int) -> bool:
  return x >= 1 and (x & (x - 1)) == 0


def _check(q, k, v, lengths, window: int, block_q: int, block_k: int, num_warps, num_stages: int):
  """Static checks; returns (B, T, N, K, H)."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, T, N, H], got shape {q.shape}")
  if k.ndim != 4:
    raise ValueError(f"k must be [B, T, K, H], got shape {k.shape}")
  if v.shape != k.shape:
    raise ValueError(f"v shape {v.shape} differs from k shape {k.shape}")
  b, t, n, h = q.shape
  if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, h):
    raise ValueError(f"k shape {k.shape} does not match q shape {q.shape} in B, T or H")
  kh = k.shape[2]
  if n % kh:
    raise ValueError(f"q has N={n} query heads, not a multiple of K={kh} kv heads")
  if not _is_pow2(h) or h < _MIN_DOT:
    raise ValueError(f"head dim H={h} must be a power of 2 >= {_MIN_DOT} (Triton dot and block shapes)")
  if q.dtype != k.dtype or v.dtype != k.dtype:
    raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must match (Triton dots take one dtype)")
  if lengths.shape != (b,):
    raise ValueError(f"lengths must be i32[B] = ({b},), got shape {lengths.shape}")
  if window < 0 or window > t:
    raise ValueError(f"window={window} must be in [0, T={t}]")
  for name, size in (("block_q", block_q), ("block_k", block_k)):
    if not _is_pow2(size) or size < _MIN_DOT:
      raise ValueError(f"{name}={size} must be a power of 2 >= {_MIN_DOT}")
  if num_warps is not None and not _is_pow2(num_warps):
    raise ValueError(f"num_warps={num_warps} must be a power of 2")
  if num_stages < 1:
    raise ValueError(f"num_stages={num_stages} must be >= 1")
  return b, t, n, kh, h


@functools.partial(jax.jit, static_argnames=("window", "h2o", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def prefill_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, window: int = 0,
                      h2o: bool = False, block_q: int = 64, block_k: int = 64, num_warps: int | None = None,
                      num_stages: int = 2, interpret: bool = False
                      ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Causal GQA prefill attention, optionally with SnapKV window votes and H2O accumulated attention.

  Args:
    q: [B, T, N, H] queries (bf16 or f32), query head n reads kv head n // G.
    k, v: [B, T, K, H] keys and values, same dtype as q.
    lengths: i32[B] valid tokens per row (right padding). Padding keys are never attended to and may hold
      anything, NaN included.
    window: W >= 0 (static); W > 0 returns window scores from each row's last W valid queries.
    h2o: (static) return scores accumulated over all valid queries.
    block_q, block_k: query / key rows per block (static powers of 2 >= 16).
    num_warps: Triton warps per program; None picks 4 for H <= 64, else 8.
    num_stages: Triton software-pipelining stages.
    interpret: run the kernels in the Pallas interpreter (CPU tests).

  Returns:
    o: [B, T, N, H] in q's dtype, softmax(q k^T / sqrt(H)) v over keys s <= t, s < lengths[b]; zeros at padding
      query rows.
    window_scores: f32[B, K, T] if window > 0, else None: for each key, its attention probability summed over the
      last W valid queries (positions lengths[b] - W .. lengths[b] - 1 that are >= 0) and averaged over the G query
      heads of the kv head; exactly 0 at padding keys. SnapKV's vote before pooling.
    h2o_scores: f32[B, K, T] if h2o, else None: the same summed over all valid queries.
  """
  b, t, n, kh, h = _check(q, k, v, lengths, window, block_q, block_k, num_warps, num_stages)
  g = n // kh
  lengths2 = jnp.asarray(lengths, jnp.int32).reshape(b, 1)
  params = plgpu.CompilerParams(num_warps=num_warps or (4 if h <= 64 else 8), num_stages=num_stages)
  qk_scale = _LOG2_E / math.sqrt(h)
  want_scores = window > 0 or h2o

  # Pass 1. Grid (query block, row, query head); whole-T blocks, sliced per program inside the kernel.
  len_spec = pl.BlockSpec((None, 1), lambda i, bi, ni: (bi, 0))
  q_spec = pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, ni, 0))
  kv_spec = pl.BlockSpec((None, t, None, h), lambda i, bi, ni: (bi, 0, lax.div(ni, g), 0))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [q_spec]
  if want_scores:
    out_shape.append(jax.ShapeDtypeStruct((b, n, t), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, t), lambda i, bi, ni: (bi, ni, 0)))
  outs = pl.pallas_call(
      functools.partial(_attention_kernel, seq_len=t, block_q=block_q, block_k=block_k, qk_scale=qk_scale),
      grid=(pl.cdiv(t, block_q), b, n),
      in_specs=[len_spec, q_spec, kv_spec, kv_spec],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name="prefill_attention",
  )(lengths2, q, k, v)
  o = outs[0]
  if not want_scores:
    return o, None, None

  # Pass 2. Grid (key block, row, kv head).
  score_shapes = [jax.ShapeDtypeStruct((b, kh, t), jnp.float32)] * (int(window > 0) + int(h2o))
  scores = pl.pallas_call(
      functools.partial(_scores_kernel, seq_len=t, groups=g, window=window,
                        window_padded=max(_MIN_DOT, pl.next_power_of_2(window)), h2o=h2o, block_q=block_q,
                        block_k=block_k, qk_scale=qk_scale),
      grid=(pl.cdiv(t, block_k), b, kh),
      in_specs=[
          pl.BlockSpec((None, 1), lambda j, bi, ki: (bi, 0)),
          pl.BlockSpec((None, t, g, h), lambda j, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, t, None, h), lambda j, bi, ki: (bi, 0, ki, 0)),
          pl.BlockSpec((None, g, t), lambda j, bi, ki: (bi, ki, 0)),
      ],
      out_specs=[pl.BlockSpec((None, None, t), lambda j, bi, ki: (bi, ki, 0))] * len(score_shapes),
      out_shape=score_shapes,
      compiler_params=params,
      interpret=interpret,
      name="prefill_scores",
  )(lengths2, q, k, outs[1])
  window_scores = scores[0] if window else None
  h2o_scores = scores[-1] if h2o else None
  return o, window_scores, h2o_scores


@functools.partial(jax.jit, static_argnames=("window", "h2o"))
def prefill_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *,
                                window: int = 0, h2o: bool = False
                                ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
  """Plain-jnp `prefill_attention` with the full T x T matrix; same arguments (minus tuning) and contract."""
  b, t, n, kh, h = _check(q, k, v, lengths, window, _MIN_DOT, _MIN_DOT, None, 1)
  g = n // kh
  lengths = jnp.asarray(lengths, jnp.int32)
  pos = jnp.arange(t, dtype=jnp.int32)
  valid = pos[None, :] < lengths[:, None]  # [B, T]
  # Zero padding before any product so that NaN there cannot leak (0 * NaN = NaN in the einsums).
  qf = jnp.where(valid[:, :, None, None], q.astype(jnp.float32), 0.0).reshape(b, t, kh, g, h)
  kf = jnp.where(valid[:, :, None, None], k.astype(jnp.float32), 0.0)
  vf = jnp.where(valid[:, :, None, None], v.astype(jnp.float32), 0.0)
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", qf, kf, precision=lax.Precision.HIGHEST) / math.sqrt(h)
  mask = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :] & valid[:, :, None]  # [B, T, S]
  mask = mask[:, None, None]
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.where(mask, jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  p = e / jnp.where(den > 0, den, 1.0)  # [B, K, G, T, S], all-zero rows for padding queries
  o = jnp.einsum("BKGTS,BSKH->BTKGH", p, vf, precision=lax.Precision.HIGHEST).reshape(b, t, n, h)
  window_scores = h2o_scores = None
  if window:
    in_window = pos[None, :] >= (lengths[:, None] - window)  # [B, T]
    window_scores = jnp.mean(jnp.sum(jnp.where(in_window[:, None, None, :, None], p, 0.0), axis=3), axis=2)
  if h2o:
    h2o_scores = jnp.mean(jnp.sum(p, axis=3), axis=2)
  return o.astype(q.dtype), window_scores, h2o_scores
