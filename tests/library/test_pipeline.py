"""compress / attend / append / decompress: exactness, selection invariants, ragged batches, decoding."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import attention, decode, pipeline
from akv_jax.testing import last_queries, random_kv, random_queries, token_at

B, K, N, S, H = 2, 2, 8, 160, 32
LENGTHS = (160, 97)


def _small(name, **overrides):
  """A preset with guard bands shrunk to fit S = 160."""
  pol = akv.presets.fixed(name)
  small = dict(recent=min(pol.recent, 32), key_group=16, value_group=16)
  return dataclasses.replace(pol, **{**small, **overrides})


def _inputs(seed=0, dtype=jnp.float32, lengths=LENGTHS):
  kv = random_kv(seed, b=B, k=K, s=S, h=H, lengths=lengths, dtype=dtype)
  return kv, random_queries(seed + 1, b=B, n=N, t=32, h=H, dtype=dtype), random_queries(seed + 2, b=B, n=N,
                                                                                         t=None, h=H)


def test_full_policy_reproduces_dense_attention():
  kv, q_obs, q = _inputs()
  ckv = akv.compress(kv, akv.presets.fixed("full"), queries=q_obs)
  out = akv.attend(q, ckv)
  np.testing.assert_allclose(out, akv.dense_attention(q, kv.k, kv.v, kv.lengths), rtol=1e-5, atol=1e-6)
  dense = akv.decompress(ckv)
  np.testing.assert_array_equal(dense.lengths, np.array(LENGTHS)[:, None].repeat(K, 1))
  for row, length in enumerate(LENGTHS):
    np.testing.assert_array_equal(dense.k[row, :, :length], kv.k[row, :, :length])
    np.testing.assert_array_equal(dense.positions[row, 0, :length], np.arange(length))


def test_full_policy_multi_token_queries_are_causal():
  kv, q_obs, _ = _inputs()
  ckv = akv.compress(kv, akv.presets.fixed("full"))
  q = random_queries(5, b=B, n=N, t=3, h=H)
  out = akv.attend(q, ckv)
  for t in range(3):
    lengths = kv.lengths - 2 + t
    np.testing.assert_allclose(out[:, :, t], akv.dense_attention(q[:, :, t], kv.k, kv.v, lengths), rtol=1e-5,
                               atol=1e-6)


SELECTING = ["streaming", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "knorm", "hybrid_5x", "hybrid_8x",
             "hybrid_12x"]


@pytest.mark.parametrize("name", SELECTING)
def test_selection_invariants(name):
  kv, q_obs, _ = _inputs(dtype=jnp.bfloat16)
  pol = _small(name)
  ckv = akv.compress(kv, pol, queries=q_obs, layer=1, num_layers=4)
  dense = akv.decompress(ckv)
  lay = pol.layout(S, 1, 4)
  for row, length in enumerate(LENGTHS):
    for head in range(K):
      n = int(dense.lengths[row, head])
      pos = np.asarray(dense.positions[row, head, :n])
      assert 1 <= n <= length
      assert np.all(np.diff(pos) > 0), "kept tokens keep their original order, no duplicates"
      assert pos.min() >= 0 and pos.max() < length, "padding is never selected"
      sinks = set(range(min(pol.n_sink, length)))
      window = set(range(max(pol.n_sink, length - lay.recent), length))
      assert sinks | window <= set(pos.tolist()), "sinks and the recent/observation window are always kept"
      assert n <= lay.n_sink + lay.recent + lay.body_capacity
      if not pol.quantized:
        np.testing.assert_array_equal(dense.k[row, head, :n], kv.k[row, head, pos].astype(jnp.float32))


@pytest.mark.parametrize("name", ["full", "kivi2", "snapkv", "adakv", "h2o", "hybrid_8x", "hybrid_12x"])
def test_ragged_batch_equals_rows_alone(name):
  kv, q_obs, q = _inputs(dtype=jnp.bfloat16)
  pol = _small(name)
  # Each row's observation queries are its own last tokens; row 1 is shorter, so its padding differs.
  ckv = akv.compress(kv, pol, queries=q_obs, layer=2, num_layers=4)
  out = akv.attend(q, ckv)
  for row in range(B):
    one = jax.tree_util.tree_map(lambda x: x[row:row + 1], kv)
    c1 = akv.compress(one, pol, queries=q_obs[row:row + 1], layer=2, num_layers=4)
    np.testing.assert_allclose(akv.attend(q[row:row + 1], c1), out[row:row + 1], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(c1), jax.tree_util.tree_leaves(ckv)):
      np.testing.assert_array_equal(a, b[row:row + 1])


@pytest.mark.parametrize("name", ["kivi2", "hybrid_8x", "adakv"])
def test_gqa_stores_kv_heads_only(name):
  kv, q_obs, _ = _inputs(dtype=jnp.bfloat16)
  ckv = akv.compress(kv, _small(name), queries=q_obs)
  assert ckv.sink_k.shape[1] == K and ckv.recent_k.shape[1] == K
  for leaf in jax.tree_util.tree_leaves(ckv):
    assert N not in leaf.shape[1:2], f"a leaf of shape {leaf.shape} is stored per query head"


def test_padding_never_pollutes_compression():
  kv, q_obs, q = _inputs(dtype=jnp.bfloat16)
  pad = jnp.arange(S)[None, None, :, None] >= kv.lengths[:, None, None, None]
  noisy = dataclasses.replace(kv, k=jnp.where(pad, 1e3, kv.k), v=jnp.where(pad, -1e3, kv.v))
  for name in ("hybrid_8x", "kivi2", "snapkv", "h2o", "knorm"):
    pol = _small(name)
    a = akv.compress(kv, pol, queries=q_obs)
    b = akv.compress(noisy, pol, queries=q_obs)
    for la, lb in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
      np.testing.assert_array_equal(la, lb)


@pytest.mark.parametrize("name, axis", [("kivi2", "channel"), ("kivi4", "channel"), ("kivi2", "token"),
                                        ("hybrid_8x", "channel")])
def test_streaming_decode_equals_compressing_at_once(name, axis):
  """Appending tokens one by one gives the same cache as compressing the longer prompt."""
  total = 320
  kv = random_kv(3, b=B, k=K, s=total, h=H, dtype=jnp.bfloat16)
  pol = _small(name, key_axis=axis)
  if pol.selection != "none":
    pol = dataclasses.replace(pol, selection="none", budget="uniform", keep=1.0)
  start = jnp.array([100, 77])
  steps = 150
  ckv = akv.compress(dataclasses.replace(kv, lengths=start), pol, reserve=total)
  for t in range(steps):
    ckv = akv.append(ckv, *token_at(kv, start + t), pol)
  ref = akv.compress(dataclasses.replace(kv, lengths=start + steps), pol, reserve=total)
  for name_, a, b in zip(("key_fill", "value_fill", "recent_fill"), (ckv.key_fill, ckv.value_fill,
                                                                     ckv.recent_fill),
                         (ref.key_fill, ref.value_fill, ref.recent_fill)):
    np.testing.assert_array_equal(a, b, err_msg=name_)
  d1, d2 = akv.decompress(ckv), akv.decompress(ref)
  np.testing.assert_array_equal(d1.k, d2.k)
  np.testing.assert_array_equal(d1.v, d2.v)
  np.testing.assert_array_equal(d1.positions, d2.positions)
  assert int(ckv.dropped.sum()) == 0
  # KIVI's residual rule: values keep exactly `recent` bf16 tokens, keys between recent and recent + group - 1.
  nv = ckv.key_fill + ckv.recent_fill - ckv.value_fill
  np.testing.assert_array_equal(nv, pol.recent)
  assert bool(jnp.all((ckv.recent_fill >= pol.recent) & (ckv.recent_fill < pol.recent + ckv.recent_capacity)))


def test_decode_keys_quantized_in_whole_groups():
  kv = random_kv(4, b=1, k=1, s=256, h=H, dtype=jnp.bfloat16)
  pol = _small("kivi2")
  ckv = akv.compress(dataclasses.replace(kv, lengths=jnp.array([64])), pol, reserve=192)
  fills = []
  for t in range(64, 160):
    ckv = akv.append(ckv, *token_at(kv, jnp.array([t])), pol)
    fills.append(int(ckv.key_fill[0, 0]))
  assert all(f % pol.keys.group == 0 for f in fills)
  assert len(set(fills)) > 2


def test_decode_attention_tracks_dense_attention():
  """Decoding with the full policy gives dense attention over the prompt plus the decoded tokens."""
  kv = random_kv(6, b=B, k=K, s=200, h=H)
  pol = akv.presets.fixed("full")
  start = jnp.array([120, 90])
  ckv = akv.compress(dataclasses.replace(kv, lengths=start), pol, reserve=80)
  q = random_queries(7, b=B, n=N, t=None, h=H)
  for t in range(40):
    ckv = akv.append(ckv, *token_at(kv, start + t), pol)
  np.testing.assert_allclose(akv.attend(q, ckv), akv.dense_attention(q, kv.k, kv.v, start + 40), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("name", ["streaming", "h2o"])
def test_bounded_policies_keep_memory_within_budget(name):
  kv = random_kv(8, b=B, k=K, s=S + 200, h=H, dtype=jnp.bfloat16)
  pol = _small(name)
  start = jnp.array([160, 120])
  prompt = dataclasses.replace(kv, k=kv.k[:, :, :S], v=kv.v[:, :, :S], lengths=start)
  q_all = random_queries(9, b=B, n=N, t=S, h=H)
  ckv = akv.compress(prompt, pol, queries=q_all, reserve=200)
  held, kept0 = akv.nbytes(ckv), ckv.kept_tokens()
  budget = round(pol.keep * S)
  for t in range(200):
    ckv = akv.append(ckv, *token_at(kv, start + t), pol)
    _, probs = akv.attend(q_all[:, :, t % S], ckv, return_probs=True)
    ckv = akv.observe(ckv, probs)
    assert akv.nbytes(ckv) == held
  kept = ckv.kept_tokens()
  assert bool(jnp.all(kept <= budget + 1)) and bool(jnp.all(kept >= kept0))
  dense = akv.decompress(ckv)
  last = np.asarray(start + 200 - 1)
  for row in range(B):
    assert int(dense.positions[row, 0, int(dense.lengths[row, 0]) - 1]) == last[row], "newest token kept"
  assert int(ckv.dropped.sum()) == 0


def test_h2o_keeps_the_heaviest_hitter():
  kv = random_kv(10, b=1, k=1, s=S + 100, h=H, dtype=jnp.bfloat16)
  pol = _small("h2o")
  prompt = dataclasses.replace(kv, k=kv.k[:, :, :S], v=kv.v[:, :, :S], lengths=jnp.array([S]))
  # Every query points at token 50's key, so H2O must never evict it while other tokens come and go.
  hitter = kv.k[0, 0, 50].astype(jnp.float32)
  q = jnp.broadcast_to(hitter * 4.0, (1, N // K * 1, H))
  q_all = jnp.broadcast_to(q[:, :, None], (1, q.shape[1], S, H))
  ckv = akv.compress(prompt, pol, queries=q_all)
  for t in range(100):
    ckv = akv.append(ckv, *token_at(kv, jnp.array([S + t])), pol)
    ckv = akv.observe(ckv, akv.attend(q, ckv, return_probs=True)[1])
  assert 50 in np.asarray(akv.decompress(ckv).positions[0, 0]).tolist()


def test_adakv_stores_sum_of_head_budgets_with_batch():
  kv, q_obs, q = _inputs(dtype=jnp.bfloat16, lengths=(160, 160))
  # Head 0 attends to a handful of tokens, head 1 spreads out: AdaKV moves budget from head 0 to head 1.
  k = kv.k.at[:, 0, 10:14].set(q_obs[:, 0, -1, None].astype(jnp.bfloat16) * 3)
  kv = dataclasses.replace(kv, k=k)
  pol = _small("adakv", keep=0.5)
  ckv = akv.compress(kv, pol, queries=q_obs)
  lay = pol.layout(S, 0, 1)
  assert ckv.paged
  pool_slots = ckv.body_pos.shape[1] * ckv.body_pos.shape[2]
  assert pool_slots == K * lay.budget_pages * lay.page_size, "pool holds the sum of head budgets"
  budgets = ckv.key_fill + ckv.recent_fill
  assert not bool(jnp.all(budgets[:, 0] == budgets[:, 1])), "heads got different budgets"
  # Budgets are whole pages: the layer keeps its mean budget rounded up to a page per head.
  np.testing.assert_array_equal(jnp.sum(ckv.value_fill, axis=1), pool_slots * np.ones(B))
  # Reading through the page table gives exactly the tokens decompress reports, and attention runs per row.
  out = akv.attend(q, ckv)
  assert out.shape == (B, N, H) and not bool(jnp.any(jnp.isnan(out)))
  # Each row's heads own exactly the pool; storing K times the largest head would have cost more.
  owned = akv.metrics.head_budgets(ckv)
  np.testing.assert_array_equal(jnp.sum(owned, axis=1), pool_slots)
  assert bool(jnp.all(jnp.max(owned, axis=1) * K > pool_slots))


def test_adakv_decode_grows_each_head_through_its_pages():
  kv = random_kv(11, b=B, k=K, s=S + 64, h=H, dtype=jnp.bfloat16)
  pol = _small("hybrid_12x")
  prompt = dataclasses.replace(kv, k=kv.k[:, :, :S], v=kv.v[:, :, :S], lengths=jnp.array([S, 130]))
  q_obs = random_queries(12, b=B, n=N, t=32, h=H, dtype=jnp.bfloat16)
  ckv = akv.compress(prompt, pol, queries=q_obs, reserve=64)
  before = akv.decompress(ckv)
  for t in range(64):
    ckv = akv.append(ckv, *token_at(kv, prompt.lengths + t), pol)
  after = akv.decompress(ckv)
  assert int(ckv.dropped.sum()) == 0
  np.testing.assert_array_equal(after.lengths, before.lengths + 64)
  for row in range(B):
    for head in range(K):
      pos = np.asarray(after.positions[row, head, :int(after.lengths[row, head])])
      start = int(prompt.lengths[row])
      assert set(range(start, start + 64)) <= set(pos.tolist())
      old = np.asarray(before.positions[row, head, :int(before.lengths[row, head])])
      np.testing.assert_array_equal(pos[:len(old)], old)


def test_overflow_is_counted_not_silent():
  kv = random_kv(13, b=1, k=1, s=256, h=H, dtype=jnp.bfloat16)
  pol = _small("kivi2")
  prompt = dataclasses.replace(kv, k=kv.k[:, :, :64], v=kv.v[:, :, :64], lengths=jnp.array([64]))
  ckv = akv.compress(prompt, pol, reserve=16)
  for t in range(64, 200):
    ckv = akv.append(ckv, *token_at(kv, jnp.array([t])), pol)
  assert int(ckv.dropped.sum()) > 0
  assert int(akv.decompress(ckv).lengths[0, 0]) == 200 - int(ckv.dropped.sum())
  with pytest.raises(Exception, match="found no room"):
    akv.checked(lambda c: c)(ckv)


def test_no_retracing_across_lengths():
  kv, q_obs, q = _inputs(dtype=jnp.bfloat16)
  pol = _small("hybrid_8x")
  comp = jax.jit(chex.assert_max_traces(pipeline._compress, n=1), static_argnums=(3, 4))
  lay = pol.layout(S, 0, 4, reserve=16)
  att = jax.jit(chex.assert_max_traces(attention._attend, n=1), static_argnums=(2, 3))
  app = jax.jit(chex.assert_max_traces(decode._append, n=1), static_argnums=(3,))
  for lengths in ((160, 97), (120, 60), (33, 159)):
    c = comp(dataclasses.replace(kv, lengths=jnp.array(lengths)), akv.selection.Observations(queries=q_obs), None,
             pol, lay)
    att(q, c, None, False)
    for t in range(3):
      c = app(c, kv.k[:, :, t], kv.v[:, :, t], pol)


def test_orbax_round_trip_gives_same_bits(tmp_path):
  import orbax.checkpoint as ocp
  kv, q_obs, _ = _inputs(dtype=jnp.bfloat16)
  ckv = akv.compress(kv, _small("hybrid_12x"), queries=q_obs)
  path = tmp_path / "ckv"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, ckv)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, jax.tree_util.tree_map(jnp.zeros_like, ckv))
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(ckv)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(ckv)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)


def test_layer_stats_under_jit():
  kv, q_obs, _ = _inputs(dtype=jnp.bfloat16, lengths=(160, 160))
  pol = _small("hybrid_8x")
  ckv = akv.compress(kv, pol, queries=q_obs)
  q_test = random_queries(20, b=B, n=N, t=4, h=H)
  stats = jax.jit(akv.layer_stats)(kv, ckv, q_test)
  assert float(stats["bytes"]) == akv.nbytes(ckv)
  assert 0.0 < float(stats["attention_retained"]) <= 1.0
  assert 0.0 < float(stats["guard_mass"]) <= float(stats["attention_retained"])
  assert 0.0 < float(stats["key_rel_error"]) < 1.0
  full = akv.compress(kv, akv.presets.fixed("full"))
  fstats = akv.layer_stats(kv, full, q_test)
  np.testing.assert_allclose(fstats["attention_retained"], 1.0, rtol=1e-6)
  assert float(fstats["key_rel_error"]) == 0.0


def test_per_layer_bits_and_bf16_guards():
  kv, q_obs, _ = _inputs(dtype=jnp.bfloat16)
  rule = _small("hybrid_8x", guard_layers=(0, -1), guard_bits=8)
  explicit = _small("kivi2", layer_bits=(4, None, 2, 8))
  for layer, (kbits, vbits) in enumerate([(8, 8), (2, 2), (2, 2), (8, 8)]):
    ckv = akv.compress(kv, rule, queries=q_obs, layer=layer, num_layers=4)
    assert (ckv.body_k.bits, ckv.body_v.bits) == (kbits, vbits)
    assert ckv.sink_k.dtype == ckv.recent_k.dtype == jnp.bfloat16, "guard tokens stay bf16"
  for layer, bits in enumerate((4, None, 2, 8)):
    ckv = akv.compress(kv, explicit, layer=layer, num_layers=4)
    if bits is None:
      assert ckv.body_k.dtype == jnp.bfloat16
    else:
      assert ckv.body_k.bits == bits and ckv.body_k.codes.dtype == jnp.uint8


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "adakv", "h2o", "hybrid_8x"])
def test_votes_select_like_queries(name):
  """compress(votes=the prefill kernel's attention votes) keeps the same tokens as compress(queries=...)."""
  from pallas_kernels.prefill_scores import prefill_attention_reference  # noqa: PLC0415 (plain jnp)
  kv, _, q = _inputs()
  pol = _small(name)
  q_all = random_queries(11, b=B, n=N, t=S, h=H)
  h2o = pol.selection == "h2o"
  _, window_votes, h2o_votes = prefill_attention_reference(
      q_all.transpose(0, 2, 1, 3), kv.k.transpose(0, 2, 1, 3), kv.v.transpose(0, 2, 1, 3), kv.lengths,
      window=0 if h2o else pol.window, h2o=h2o)
  queries = last_queries(q_all, kv.lengths, S if h2o else pol.window)
  want = akv.compress(kv, pol, queries=queries, layer=3, num_layers=4)
  got = akv.compress(kv, pol, votes=h2o_votes if h2o else window_votes, layer=3, num_layers=4)
  want_d, got_d = akv.decompress(want), akv.decompress(got)
  np.testing.assert_array_equal(got_d.positions, want_d.positions)
  np.testing.assert_array_equal(got_d.lengths, want_d.lengths)
  np.testing.assert_allclose(akv.attend(q, got), akv.attend(q, want), rtol=1e-5, atol=1e-6)
  if h2o:   # the accumulated scores decoding keeps updating start from the same values
    np.testing.assert_allclose(got.state.scores, want.state.scores, rtol=1e-5, atol=1e-6)
