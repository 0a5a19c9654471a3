"""Prefill-time compression and analysis-time decompression of one layer's cache.

compress: DenseKV -> scores -> kept indices -> gathered K/V -> quantized body + bf16 sinks and recent window.
decompress: CompressedKV -> DenseKV of the kept tokens (dequantized) with their original positions.

Both are pure and jit-compatible with the policy, layer, num_layers and reserve static; lengths are arrays, so a
new prompt length of the same capacity S does not retrace.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from akv_jax import body as _body
from akv_jax import outliers as _outliers
from akv_jax import rotation as _rotation
from akv_jax import selection, validation
from akv_jax.cache import CompressedKV, DenseKV
from akv_jax.policy import Layout, Policy
from akv_jax.selection import Observations
from akv_jax.quant import quantize

_NEG = -jnp.inf


def _take(x: jax.Array, idx: jax.Array, valid: jax.Array) -> jax.Array:
  """Gathers x [B, K, S, ...] at idx i32[B, K, n] along S; invalid slots are zeroed (never garbage)."""
  s = x.shape[2]
  idx = jnp.clip(idx, 0, s - 1)
  expand = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
  out = jnp.take_along_axis(x, expand, axis=2)
  return jnp.where(valid.reshape(valid.shape + (1,) * (x.ndim - 3)), out, jnp.zeros((), x.dtype))


def _window_start(lay: Layout, lengths: jax.Array) -> jax.Array:
  """i32[B]: where each row's bf16 recent window starts (after the sinks)."""
  return jnp.maximum(lay.n_sink, jnp.asarray(lengths, jnp.int32) - lay.recent)


def _candidates(lay: Layout, scores: jax.Array, ws: jax.Array) -> jax.Array:
  """Scores f32[B, K, S] of the tokens a selection may keep (past the sinks, before the window), -inf elsewhere."""
  pos = jnp.arange(scores.shape[-1])[None, None, :]
  return jnp.where((pos >= lay.n_sink) & (pos < ws[:, None, None]), scores, _NEG)


def _select(policy: Policy, lay: Layout, kv: DenseKV, scores, ws, budget=None):
  """Kept body tokens per head: (sorted indices i32[B, K, n], kept count i32[B, K], budgets or None).

  budget: i32[B, K] tokens per head decided outside (a pooled layer group's split), for paged layouts."""
  b, kh, s, _ = kv.k.shape
  z = lay.n_sink
  avail = jnp.maximum(ws - z, 0)[:, None]  # [B, 1] candidates per row
  if lay.paged:
    n = (lay.max_pages - lay.reserve_pages) * lay.page_size   # the most one head may keep (its cap)
  else:
    n = lay.selected
  n = min(n, s)
  if scores is None or n == 0:
    idx = jnp.broadcast_to(z + jnp.arange(n, dtype=jnp.int32), (b, kh, n))
    # A paged layout with no room for selected tokens (keep at the guard bands' floor) owns no budget pages.
    budget = jnp.zeros((b, kh), jnp.int32) if lay.paged else None
    return idx, jnp.minimum(avail, n) * jnp.ones((b, kh), jnp.int32), budget
  masked = _candidates(lay, scores, ws)
  if budget is None and lay.paged:
    total = kh * lay.budget_pages * lay.page_size
    budget = selection.adakv_head_budgets(masked, total, alpha=policy.budget.alpha, granularity=lay.page_size,
                                          cap=n)
  elif budget is None:
    budget = jnp.full((b, kh), n, jnp.int32)
  vals, idx = jax.lax.top_k(masked, n)
  rank = jnp.arange(n)[None, None, :]
  keep = (vals > _NEG) & (rank < budget[:, :, None])
  # Original order: kept indices first (ascending), dropped slots pushed past S.
  idx = jnp.sort(jnp.where(keep, idx, s), axis=-1).astype(jnp.int32)
  count = jnp.sum(keep, axis=-1).astype(jnp.int32)
  return idx, count, (budget if lay.paged else None)


def _page_table(lay: Layout, budget: jax.Array, first: jax.Array | None = None) -> jax.Array:
  """i32[B, K, P_max]: head h owns its budget pages packed after the heads before it, then its reserve pages.

  first: i32[B] the pool page this layer's pages start at (a pooled layer group; its selected pages then
  take what they were given, and the reserve pages follow them), or None: a pool of this layer alone."""
  b, kh = budget.shape
  pages = budget // lay.page_size
  start = jnp.cumsum(pages, axis=-1) - pages
  p = jnp.arange(lay.max_pages)[None, None, :]
  reserve_base = kh * lay.budget_pages + jnp.arange(kh)[None, :, None] * lay.reserve_pages
  if first is not None:
    start = start + first[:, None]
    reserve_base = (first + jnp.sum(pages, axis=-1))[:, None, None] + jnp.arange(kh)[None, :, None] * lay.reserve_pages
  own = jnp.where(p < pages[..., None], start[..., None] + p,
                  jnp.where(p < pages[..., None] + lay.reserve_pages, reserve_base + p - pages[..., None], -1))
  return own.astype(jnp.int32)


def _to_pool(leaf: jax.Array, table: jax.Array, pool_pages: int, into: jax.Array | None = None) -> jax.Array:
  """Per-head body leaf [B, K, P_max * r, ...] -> pooled [B, 1, pool_pages * r, ...] through the page table.

  into: the pool this layer joins (a pooled layer group), whose pages the table does not own are kept."""
  b, kh = table.shape[:2]
  max_pages = table.shape[-1]
  rows = leaf.shape[2] // max_pages
  x = leaf.reshape(b, kh * max_pages, rows, *leaf.shape[3:])
  # Invert the table: which (head, page) fills each pool page. Unowned pool pages read an all-zero page.
  # Unowned table entries (-1) must not wrap around to the last pool page.
  flat = jnp.where(table < 0, pool_pages, table).reshape(b, -1)
  src = jnp.full((b, pool_pages), kh * max_pages, jnp.int32)
  src = jax.vmap(lambda s_, t: s_.at[t].set(jnp.arange(t.shape[0], dtype=jnp.int32), mode="drop"))(src, flat)
  x = jnp.concatenate([x, jnp.zeros_like(x[:, :1])], axis=1)
  out = jnp.take_along_axis(x, src.reshape(b, pool_pages, *([1] * (x.ndim - 2))), axis=1)
  if into is not None:
    owned = (src < kh * max_pages).reshape(b, pool_pages, *([1] * (x.ndim - 2)))
    out = jnp.where(owned, out, into[:, 0].reshape(out.shape))
  return out.reshape(b, 1, pool_pages * rows, *leaf.shape[3:])


def _store(x: jax.Array, spec, valid: jax.Array, channels=None):
  if spec is None:
    return x
  return quantize(x, spec, valid, channels=channels if spec.outliers else None)


def _scores(policy: Policy, lay: Layout, kv: DenseKV, obs: Observations) -> jax.Array | None:
  """f32[B, K, S] selection scores, or None when nothing is selected by score (keep all, or recency only)."""
  scorer = policy.scorer
  if scorer is None or scorer.recency_only:
    return None
  return scorer.score(kv, obs)


def _compress(kv: DenseKV, obs: Observations, signs, policy: Policy, lay: Layout, group=None,
              pool_pages: int | None = None) -> CompressedKV:
  """signs: int8[K, 2, H] of the rotated storage (akv_jax.rotation), or None.

  group: for a layer of a pooled group (akv_jax.pooled), (scores f32[B, K, S] as `_scores` gives them,
  budget i32[B, K] tokens per head, first i32[B] the layer's first pool page, pool: the group's LayerPool so
  far or None); pool_pages (static) is then the group pool's pages per row. The returned view's body is the
  group pool with this layer's pages written."""
  b, kh, s, h = validation.dense(kv, per_row_lengths=True)
  if policy.scorer is not None:
    policy.scorer.check_observations(obs, b, kh, h, s)
  elif obs.votes is not None:
    raise ValueError("votes are read only by scorers that take the prefill kernel's votes (Needs.votes), "
                     "not selection='none'")
  z, u = lay.n_sink, lay.flush
  lengths = jnp.asarray(kv.lengths, jnp.int32)
  ws = _window_start(lay, lengths)                                # [B]
  w = jnp.maximum(lengths - ws, 0)                                # [B] window tokens
  if group is None:
    scores, given, first, into = _scores(policy, lay, kv, obs), None, None, None
  else:
    scores, given, first, into = group
  sel_idx, count, budget = _select(policy, lay, kv, scores, ws, given)
  rot = None
  if signs is not None:
    # Selected from the tokens as they are; stored rotated (every part, so one query rotation serves them all).
    rot = jnp.broadcast_to(signs[None], (b,) + signs.shape)
    kv = dataclasses.replace(kv, k=_rotation.rotate(kv.k, rot[:, :, 0]).astype(kv.k.dtype),
                             v=_rotation.rotate(kv.v, rot[:, :, 1]).astype(kv.v.dtype))
  channels = None
  if lay.key_spec is not None and lay.key_spec.outliers:
    # Chosen from this prompt's keys (in the basis they are stored in) and observation queries.
    q_obs = obs.queries
    if q_obs is not None and rot is not None:
      q_obs = _rotation.rotate_queries(q_obs, rot[:, :, 0]).astype(q_obs.dtype)
    channels = _outliers.choose(kv.k, kv.valid(), lay.key_spec.outliers, q_obs, group=lay.key_spec.group)
  n = sel_idx.shape[-1]
  kb = (count // u) * u                                          # keys quantized in whole groups
  vb = count

  # Body: selected tokens, slot i = i-th kept token in original order.
  m_heads = lay.body_capacity
  slot = jnp.arange(m_heads, dtype=jnp.int32)[None, None, :]
  body_idx = jnp.pad(sel_idx, ((0, 0), (0, 0), (0, max(m_heads - n, 0))), constant_values=s)[..., :m_heads]
  kvalid, vvalid = slot < kb[..., None], slot < vb[..., None]
  body_k = _store(_take(kv.k, body_idx, kvalid), lay.key_spec, kvalid, channels)
  body_v = _store(_take(kv.v, body_idx, vvalid), lay.value_spec, vvalid)
  positions = kv.token_positions()
  body_pos = jnp.where(vvalid, _take(positions, body_idx, vvalid), -1)

  # Recent buffer: logical slots from key_fill on: the kept tokens whose keys did not fill a group, then the
  # bf16 window.
  rc = lay.recent_capacity
  j = kb[..., None] + jnp.arange(rc, dtype=jnp.int32)[None, None, :]   # logical index of recent slot
  from_sel = j < count[..., None]
  win = j - count[..., None]
  ridx = jnp.where(from_sel, jnp.take_along_axis(sel_idx, jnp.clip(j, 0, max(n - 1, 0)), axis=-1)
                   if n else s, ws[:, None, None] + win)
  rvalid = from_sel | (win < w[:, None, None])
  recent_k, recent_v = _take(kv.k, ridx, rvalid), _take(kv.v, ridx, rvalid)
  recent_pos = jnp.where(rvalid, _take(positions, ridx, rvalid), -1)
  recent_fill = (count - kb) + w[:, None]

  sidx = jnp.broadcast_to(jnp.arange(z, dtype=jnp.int32), (b, kh, z))
  sink_fill = jnp.minimum(lengths, z)
  svalid = sidx < sink_fill[:, None, None]

  page_table, page_size = None, 1
  if lay.paged:
    page_table, page_size = _page_table(lay, budget, first), lay.page_size
    pool = lay.pool_pages(kh) if pool_pages is None else pool_pages
    if into is None:
      body_k, body_v, body_pos = jax.tree_util.tree_map(
          lambda leaf: _to_pool(leaf, page_table, pool), (body_k, body_v, body_pos))
      # Pool pages no head owns (none when the budgets sum exactly; in a pooled group, the pages of the layers
      # not yet written) read as empty.
      body_pos = jnp.where(_to_pool(vvalid, page_table, pool), body_pos, -1)
    else:   # a later layer of a pooled group: the pages it does not own keep what the layers before it wrote
      body_k, body_v, body_pos = jax.tree_util.tree_map(
          lambda leaf, acc: _to_pool(leaf, page_table, pool, acc), (body_k, body_v, body_pos),
          (into.body_k, into.body_v, into.body_pos))

  state = None
  if policy.decode.state_type is not None:
    # The decode rule starts from the selection scores of the tokens it holds (H2O: the attention they got).
    if scores is None:
      slot_scores = jnp.zeros((b, kh, m_heads + rc), jnp.float32)
    else:
      slot_scores = jnp.concatenate([jnp.where(vvalid, _take(scores, body_idx, vvalid), 0.0),
                                     jnp.where(rvalid, _take(scores, ridx, rvalid), 0.0)], axis=-1)
    state = policy.decode.initial_state(slot_scores)
  return CompressedKV(
      sink_k=_take(kv.k, sidx, svalid), sink_v=_take(kv.v, sidx, svalid),
      body_k=body_k, body_v=body_v, body_pos=body_pos.astype(jnp.int32),
      key_fill=kb.astype(jnp.int32), value_fill=vb.astype(jnp.int32),
      recent_k=recent_k, recent_v=recent_v, recent_pos=recent_pos.astype(jnp.int32),
      recent_fill=recent_fill.astype(jnp.int32), sink_fill=sink_fill, next_pos=lengths,
      dropped=jnp.zeros((b, kh), jnp.int32), page_table=page_table, state=state, rotation=rot,
      outlier_channels=channels, page_size=page_size)


# Compiled per (policy, layout), not per layer: layers whose budgets and bits agree share one program.
_compress_jit = jax.jit(_compress, static_argnames=("policy", "lay", "pool_pages"))


@functools.partial(jax.jit, static_argnames=("policy", "lay"))
def _group_scores(kv: DenseKV, obs: Observations, policy: Policy, lay: Layout) -> tuple[jax.Array, jax.Array]:
  """A layer's selection scores and its candidates' scores (what a pooled group's split ranks), f32[B, K, S]."""
  validation.dense(kv, per_row_lengths=True)
  policy.scorer.check_observations(obs, *kv.k.shape[:2], kv.k.shape[3], kv.k.shape[2])
  scores = _scores(policy, lay, kv, obs)
  return scores, _candidates(lay, scores, _window_start(lay, kv.lengths))


def compress(kv: DenseKV, policy: Policy, *, queries: jax.Array | None = None, votes: jax.Array | None = None,
             inv_freq: jax.Array | None = None, layer: int = 0, num_layers: int = 1,
             reserve: int = 0) -> CompressedKV:
  """Compresses one layer's prefill cache (jitted; the policy and the layer's static layout key the compile).

  Args:
    kv: DenseKV with k, v [B, K, S, H] and per-row lengths i32[B] (right-padded).
    policy: static Policy.
    queries: [B, N, T, H] observation queries: the last T prompt queries of each row (row b's query t sits at
      position lengths[b] - T + t). How many a scorer reads is `policy.scorer.needs(S).queries`: SnapKV the
      last `window`, TOVA the last one, H2O and Expected Attention all T.
    votes: f32[B, K, S] instead of queries, for snapkv and h2o selections: each slot's attention probability
      summed over the observation queries (SnapKV: the last `window`; H2O: all prompt queries) and averaged
      over the G query heads of its kv head, as pallas_kernels.prefill_scores.prefill_attention returns them
      in the same pass as the prefill attention. Pooling and masking are applied here.
    inv_freq: f32[H / 2] the model's rotary inverse frequencies, for scorers that need them (Expected
      Attention: `akv_jax.models.inverse_frequencies(config)`).
    layer, num_layers: pick the layer's budget (PyramidKV) and bits (guard layers).
    reserve: number of tokens decoding will append; sizes the body of non-evicting policies.

  A policy whose budget has a byte `target` is first resolved to the keep that meets it on this cache's shape
  (S, K, H, num_layers, reserve; akv_jax.ratios.resolve_target, cached per shape).

  Returns:
    CompressedKV holding only the kept tokens, at the layer's precision.
  """
  _, kh, s, h = validation.dense(kv, per_row_lengths=True)
  if policy.budget.pooled_layers:
    raise ValueError(f"policy {policy.name!r} splits its budget across layers (budget={policy.budget.name!r}): "
                     "compress all layers together with compress_layers")
  policy = _resolved(policy, s, kh, h, num_layers, reserve)
  lay = policy.layout(s, layer, num_layers, reserve=reserve)
  obs = Observations(queries=queries, votes=votes,
                     inv_freq=None if inv_freq is None else jnp.asarray(inv_freq, jnp.float32))
  signs = None if policy.rotation is None else jnp.asarray(_rotation.signs(policy.rotation, layer, kh, h))
  return _compress_jit(kv, obs, signs, policy=policy, lay=lay)


def _resolved(policy: Policy, s: int, kh: int, h: int, num_layers: int, reserve: int) -> Policy:
  """The policy with a byte target resolved to the keep that meets it on this shape (itself without one)."""
  if policy.budget.target is None:
    return policy
  from akv_jax import ratios  # noqa: PLC0415 (ratios measures policies through this module)
  return ratios.resolve_target(policy, ratios.CacheShape(s=s, num_layers=num_layers, kv_heads=kh, head_dim=h),
                               reserve=reserve)


def compress_layers(kvs, policy: Policy, *, queries=None, votes=None, inv_freq=None, reserve: int = 0):
  """Compresses per-layer DenseKV (with per-layer queries, or votes, or None; one inv_freq for the model) into a
  multi-layer cache: a tuple of CompressedKV, or for a budget split across layers (`Adaptive`) a PooledCache."""
  num_layers = len(kvs)
  qs = queries if queries is not None else (None,) * num_layers
  vs = votes if votes is not None else (None,) * num_layers
  if len(qs) != num_layers:
    raise ValueError(f"got {len(qs)} query sets for {num_layers} layers")
  if len(vs) != num_layers:
    raise ValueError(f"got {len(vs)} vote sets for {num_layers} layers")
  if policy.budget.pooled_layers:
    return _compress_pooled(kvs, policy, qs, vs, inv_freq, reserve)
  return tuple(compress(kv, policy, queries=q, votes=v, inv_freq=inv_freq, layer=i, num_layers=num_layers,
                        reserve=reserve) for i, (kv, q, v) in enumerate(zip(kvs, qs, vs)))


def _compress_pooled(kvs, policy: Policy, qs, vs, inv_freq, reserve: int):
  """compress_layers for a budget split across the layers of each group (akv_jax.pooled).

  The layers stored alike (equal layouts: same bits, groups and capacities) form a group. Its pages are split
  among all its (layer, kv head) pairs by AdaKV's rule over their candidates' scores at once, row by row: the
  pairs whose tokens hold the most attention mass get the pages, within `cap` times the mean and with `alpha` of
  the mean kept by every pair. Then each layer is compressed with its heads' budgets into the group's pool, its
  pages after those of the layers before it.
  """
  from akv_jax.pooled import LayerPool, PooledCache  # noqa: PLC0415 (pooled builds on the cache types only)

  num_layers = len(kvs)
  b, kh, s, h = validation.dense(kvs[0], per_row_lengths=True)
  for i, kv in enumerate(kvs):
    if tuple(kv.k.shape) != (b, kh, s, h):
      raise ValueError(f"layer {i} has a cache of shape {kv.k.shape}, layer 0 {(b, kh, s, h)}: a pooled group "
                       "needs one shape")
  policy = _resolved(policy, s, kh, h, num_layers, reserve)
  freq = None if inv_freq is None else jnp.asarray(inv_freq, jnp.float32)
  obs = [Observations(queries=q, votes=v, inv_freq=freq) for q, v in zip(qs, vs)]
  signs = [None if policy.rotation is None else jnp.asarray(_rotation.signs(policy.rotation, i, kh, h))
           for i in range(num_layers)]
  lays = [policy.layout(s, i, num_layers, reserve=reserve) for i in range(num_layers)]
  members: dict[Layout, list[int]] = {}
  for i, lay in enumerate(lays):
    members.setdefault(lay, []).append(i)
  group_of = [0] * num_layers
  views = [None] * num_layers
  for g, (lay, layers) in enumerate(members.items()):
    q, n = lay.page_size, len(layers)
    scored = [_group_scores(kvs[i], obs[i], policy, lay) for i in layers]
    cap = (lay.max_pages - lay.reserve_pages) * q
    total = n * kh * lay.budget_pages * q
    if total:
      split = selection.adakv_head_budgets(jnp.concatenate([c for _, c in scored], axis=1), total,
                                           alpha=policy.budget.alpha, granularity=q, cap=cap)
    else:
      split = jnp.zeros((b, n * kh), jnp.int32)
    split = split.reshape(b, n, kh)
    pages = jnp.sum(split, axis=-1) // q + kh * lay.reserve_pages                       # [B, n]
    first = jnp.cumsum(pages, axis=1) - pages
    pool = None
    for j, i in enumerate(layers):
      view = _compress_jit(kvs[i], obs[i], signs[i], policy=policy, lay=lay,
                           group=(scored[j][0], split[:, j], first[:, j], pool), pool_pages=n * lay.pool_pages(kh))
      pool = LayerPool(body_k=view.body_k, body_v=view.body_v, body_pos=view.body_pos)
      views[i], group_of[i] = view, g
  return PooledCache.build(views, group_of)


def logical_view(ckv: CompressedKV, dtype=jnp.float32):
  """Per-head logical order of the kept non-sink tokens.

  Returns (k, v, pos, valid): k, v [B, K, M + R, H] in `dtype`, pos i32[B, K, M + R], valid bool[B, K, M + R];
  slot i is the i-th kept token after the sinks (body slots first, then the recent buffer). Rotated storage is
  rotated back: this is the tokens as they were given.
  """
  bk = _body.dequantize_heads(ckv, ckv.body_k, dtype)
  bv = _body.dequantize_heads(ckv, ckv.body_v, dtype)
  bpos = _body.head_positions(ckv)
  m = bk.shape[2]
  rc = ckv.recent_capacity
  i = jnp.arange(m + rc, dtype=jnp.int32)[None, None, :]
  kb, vb = ckv.key_fill[..., None], ckv.value_fill[..., None]
  kidx = jnp.where(i < kb, i, m + i - kb)
  vidx = jnp.where(i < vb, i, m + i - kb)
  valid = i < kb + ckv.recent_fill[..., None]
  allk = jnp.concatenate([bk, ckv.recent_k.astype(dtype)], axis=2)
  allv = jnp.concatenate([bv, ckv.recent_v.astype(dtype)], axis=2)
  allp = jnp.concatenate([bpos, ckv.recent_pos], axis=2)
  k, v = _take(allk, kidx, valid), _take(allv, vidx, valid)
  if ckv.rotation is not None:
    k = _rotation.unrotate(k, ckv.rotation[:, :, 0]).astype(dtype)
    v = _rotation.unrotate(v, ckv.rotation[:, :, 1]).astype(dtype)
  return k, v, jnp.where(valid, _take(allp, vidx, valid), -1), valid


@jax.jit
def decompress(ckv: CompressedKV) -> DenseKV:
  """The kept tokens as a DenseKV [B, K, Z + M + R, H] (f32), sorted by original position, lengths i32[B, K]."""
  validation.compressed(ckv)
  k, v, pos, valid = logical_view(ckv)
  z = ckv.sink_k.shape[2]
  spos = jnp.broadcast_to(jnp.arange(z, dtype=jnp.int32), ckv.sink_k.shape[:3])
  svalid = spos < ckv.sink_fill[:, None, None]
  sink_k, sink_v = ckv.sink_k.astype(jnp.float32), ckv.sink_v.astype(jnp.float32)
  if ckv.rotation is not None:
    sink_k, sink_v = _rotation.unrotate(sink_k, ckv.rotation[:, :, 0]), _rotation.unrotate(sink_v, ckv.rotation[:, :, 1])
  k = jnp.concatenate([sink_k, k], axis=2)
  v = jnp.concatenate([sink_v, v], axis=2)
  pos = jnp.concatenate([jnp.where(svalid, spos, -1), pos], axis=2)
  valid = jnp.concatenate([svalid, valid], axis=2)
  # Sort valid tokens by position (evicting policies reuse body slots out of order), empties last.
  key = jnp.where(valid, pos, jnp.iinfo(jnp.int32).max)
  order = jnp.argsort(key, axis=-1)
  k = jnp.take_along_axis(k, order[..., None], axis=2)
  v = jnp.take_along_axis(v, order[..., None], axis=2)
  pos = jnp.take_along_axis(pos, order, axis=2)
  lengths = jnp.sum(valid, axis=-1).astype(jnp.int32)
  return DenseKV(k=k, v=v, lengths=lengths, positions=pos)
