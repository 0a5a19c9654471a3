"""Every static error path raises ValueError naming the bad value; value problems are caught by akv.checked."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax.testing import random_kv, random_queries

B, K, N, S, H = 2, 2, 4, 96, 16


@pytest.fixture(scope="module")
def kv():
  return random_kv(0, b=B, k=K, s=S, h=H, lengths=(96, 50))


@pytest.fixture(scope="module")
def q_obs():
  return random_queries(1, b=B, n=N, t=32, h=H)


SNAP = akv.Policy(selection="snapkv", keep=0.5, recent=32, window=32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(selection="magic"), "selection='magic' is unknown"),
    (dict(selection="snapkv", budget="fancy"), "budget='fancy' is unknown"),
    (dict(selection="snapkv", keep=0.0), r"keep=0.0 must be in \(0, 1\]"),
    (dict(selection="snapkv", keep=1.5), r"keep=1.5 must be in \(0, 1\]"),
    (dict(keep=0.5), "selection='none' keeps every token; keep=0.5"),
    (dict(n_sink=-1), "n_sink=-1 must be >= 0"),
    (dict(recent=-2), "recent=-2 must be >= 0"),
    (dict(window=-3), "window=-3 must be >= 0"),
    (dict(recent_frac=1.0), r"recent_frac=1.0 must be in \[0, 1\)"),
    (dict(selection="snapkv", keep=0.5, window=0), "window=0 must be >= 1"),
    (dict(selection="snapkv", keep=0.5, window=64, recent=32), "window=64 must not exceed recent=32"),
    (dict(kernel_size=4), "kernel_size=4 must be odd"),
    (dict(pooling="min"), r"pooling='min' must be one of \('max', 'avg', 'kvpress'\)"),
    (dict(reduce="median"), "reduce='median' must be 'mean' or 'sum'"),
    (dict(adakv_alpha=1.5), r"adakv_alpha=1.5 must be in \[0, 1\]"),
    (dict(adakv_cap=0.5), "adakv_cap=0.5 must be >= 1"),
    (dict(key_bits=5), "key_bits=5 is not supported"),
    (dict(value_bits=1), "value_bits=1 is not supported"),
    (dict(guard_bits=16), "guard_bits=16 is not supported"),
    (dict(layer_bits=(2, 5)), r"layer_bits\[1\]=5 is not supported"),
    (dict(key_axis="head"), "key_axis='head' must be 'channel' or 'token'"),
    (dict(key_group=0), "key_group=0 must be >= 1"),
    (dict(value_group=-1), "value_group=-1 must be >= 1"),
    (dict(selection="h2o", keep=0.2, key_bits=2),
     "selection='h2o' with decode rule 'heavy_hitter' evicts during decoding and keeps a bf16 body"),
    (dict(selection="streaming", keep=0.2, budget="pyramid"),
     r"decode rule 'sliding_window' \(selection='streaming'\) needs budget='uniform'"),
    # The composed spelling.
    (dict(scorer="magic"), "selection='magic' is unknown"),
    (dict(scorer=akv.selection.SnapKV(), decode="teleport"), "decode='teleport' is unknown"),
    (dict(scorer=akv.selection.TOVA(), budget=akv.selection.Uniform(keep=0.5), decode="sliding_window",
          keys=akv.QuantSpec(bits=4)), "with decode rule 'sliding_window' evicts during decoding"),
    (dict(scorer=42), "scorer=42 is not a Scorer"),
    (dict(values=akv.QuantSpec(bits=2, axis="channel")), "values are quantized per token"),
    (dict(budget=akv.selection.Uniform(keep=0.5)), "selection='none' keeps every token; keep=0.5"),
])
def test_policy_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    akv.Policy(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: akv.selection.Uniform(keep=0.0), r"keep=0.0 must be in \(0, 1\]"),
    (lambda: akv.selection.Pyramid(keep=0.5, beta=0.0), "pyramid_beta=0.0 must be > 0"),
    (lambda: akv.selection.AdaKV(keep=0.5, alpha=-0.1), r"adakv_alpha=-0.1 must be in \[0, 1\]"),
    (lambda: akv.selection.AdaKV(keep=0.5, cap=0.9), "adakv_cap=0.9 must be >= 1"),
    (lambda: akv.selection.SnapKV(window=0), "window=0 must be >= 1 for selection='snapkv'"),
    (lambda: akv.selection.SnapKV(kernel_size=2), "kernel_size=2 must be odd"),
    (lambda: akv.selection.SnapKV(pooling="min"), r"pooling='min' must be one of \('max', 'avg', 'kvpress'\)"),
    (lambda: akv.selection.SnapKV(reduce="median"), "reduce='median' must be 'mean' or 'sum'"),
    (lambda: akv.selection.ExpectedAttention(future=0), "future=0 must be >= 1"),
    (lambda: akv.selection.ExpectedAttention(n_sink=-1), "n_sink=-1 must be >= 0"),
    (lambda: akv.selection.ExpectedAttention(epsilon=-1.0), "epsilon=-1.0 must be >= 0"),
    (lambda: akv.policy.Guards(n_sink=-1), "n_sink=-1 must be >= 0"),
    (lambda: akv.policy.Guards(bits=5), "guard_bits=5 is not supported"),
    (lambda: akv.selection.scorer("magic"), "selection='magic' is unknown"),
    (lambda: akv.selection.register(int), "register expects a Scorer subclass"),
    (lambda: akv.selection.register(type("Nameless", (akv.selection.Scorer,), {})), "scorer Nameless has no name"),
    (lambda: akv.selection.register(type("Snap2", (akv.selection.Scorer,), {"name": "snapkv"})),
     "a scorer named 'snapkv' is already registered"),
])
def test_part_settings(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_unknown_policy_keyword_names_the_parts():
  with pytest.raises(TypeError, match="unexpected keyword 'windw'; its parts are scorer, budget"):
    akv.Policy(windw=3)


def test_layer_errors():
  with pytest.raises(ValueError, match="layer=4 is out of range for num_layers=4"):
    akv.Policy().bits_for(4, 4)
  with pytest.raises(ValueError, match="layer_bits has 2 entries for num_layers=4"):
    akv.Policy(layer_bits=(2, 4)).bits_for(0, 4)
  with pytest.raises(ValueError, match=r"guard_layers=\(7,\) has entries out of range for num_layers=4"):
    akv.Policy(guard_layers=(7,), guard_bits=4).bits_for(0, 4)


def test_layout_errors():
  with pytest.raises(ValueError, match="sequence length S=0 must be >= 1"):
    SNAP.layout(0, 0, 1)
  with pytest.raises(ValueError, match="reserve=-1 must be >= 0"):
    SNAP.layout(96, 0, 1, reserve=-1)
  with pytest.raises(ValueError, match="window=32 is longer than the sequence S=16"):
    SNAP.layout(16, 0, 1)
  with pytest.raises(ValueError, match=r"keep=0.1 gives 10 tokens at S=96, fewer than n_sink=4 plus recent=32"):
    dataclasses.replace(SNAP, keep=0.1).layout(96, 0, 1)


def test_dense_cache_errors(kv, q_obs):
  pol = akv.presets.get("full")
  with pytest.raises(ValueError, match="expected a DenseKV, got tuple"):
    akv.compress((kv.k, kv.v), pol)
  with pytest.raises(ValueError, match=r"k must be \[B, K, S, H\], got shape \(2, 96, 16\)"):
    akv.compress(akv.DenseKV(k=kv.k[:, 0], v=kv.v[:, 0], lengths=kv.lengths), pol)
  with pytest.raises(ValueError, match=r"v shape \(2, 2, 95, 16\) must equal k shape"):
    akv.compress(dataclasses.replace(kv, v=kv.v[:, :, :95]), pol)
  with pytest.raises(ValueError, match=r"lengths shape \(3,\) must be one of"):
    akv.compress(dataclasses.replace(kv, lengths=jnp.zeros(3, jnp.int32)), pol)
  with pytest.raises(ValueError, match=r"positions shape \(2, 2, 5\) must be"):
    akv.compress(dataclasses.replace(kv, positions=jnp.zeros((2, 2, 5), jnp.int32)), pol)


def test_query_errors(kv, q_obs):
  with pytest.raises(ValueError, match="selection='snapkv' needs observation queries"):
    akv.compress(kv, SNAP)
  with pytest.raises(ValueError, match=r"queries must be \[B, N, T, H\], got shape \(2, 4, 16\)"):
    akv.compress(kv, SNAP, queries=q_obs[:, :, 0])
  with pytest.raises(ValueError, match="queries batch 1 does not match the cache batch 2"):
    akv.compress(kv, SNAP, queries=q_obs[:1])
  with pytest.raises(ValueError, match="queries heads N=3 must be a multiple of the kv heads K=2"):
    akv.compress(kv, SNAP, queries=q_obs[:, :3])
  with pytest.raises(ValueError, match="queries head dim 8 does not match the cache head dim 16"):
    akv.compress(kv, SNAP, queries=q_obs[..., :8])
  with pytest.raises(ValueError, match="queries hold 8 tokens, fewer than window=32"):
    akv.compress(kv, SNAP, queries=q_obs[:, :, :8])
  with pytest.raises(ValueError, match="got 1 query sets for 2 layers"):
    akv.compress_layers([kv, kv], SNAP, queries=[q_obs])


def test_vote_errors(kv, q_obs):
  votes = jnp.ones((B, K, S), jnp.float32)
  with pytest.raises(ValueError, match=r"votes are read only by scorers that take the prefill kernel's votes \(Needs.votes\), not selection='knorm'"):
    akv.compress(kv, dataclasses.replace(SNAP, selection="knorm"), votes=votes)
  with pytest.raises(ValueError, match="pass queries or votes, not both"):
    akv.compress(kv, SNAP, queries=q_obs, votes=votes)
  with pytest.raises(ValueError, match=r"votes must be \[B, K, S\] = \(2, 2, 96\) to match the cache, "
                                       r"got shape \(2, 2, 95\)"):
    akv.compress(kv, SNAP, votes=votes[..., :95])
  with pytest.raises(ValueError, match=r"votes must be \[B, K, S\]"):
    akv.compress(kv, dataclasses.replace(SNAP, selection="h2o"), votes=votes[:1])
  with pytest.raises(ValueError, match="window=128 is longer than the sequence S=96"):
    akv.compress(kv, dataclasses.replace(SNAP, window=128, recent=128), votes=votes)
  with pytest.raises(ValueError, match=r"needs observation queries; pass queries=\[B, N, T, H\] or votes"):
    akv.compress(kv, dataclasses.replace(SNAP, selection="h2o"))
  with pytest.raises(ValueError, match="got 1 vote sets for 2 layers"):
    akv.compress_layers([kv, kv], SNAP, votes=[votes])


def test_attend_and_append_errors(kv, q_obs):
  pol = akv.presets.get("full")
  ckv = akv.compress(kv, pol)
  q = q_obs[:, :, 0]
  with pytest.raises(ValueError, match=r"q must be \[B, N, H\] or \[B, N, T, H\], got shape \(2, 4\)"):
    akv.attend(q[..., 0], ckv)
  with pytest.raises(ValueError, match="q heads N=5 must be a multiple of the kv heads K=2"):
    akv.attend(jnp.zeros((B, 5, H)), ckv)
  with pytest.raises(ValueError, match="implementation='pallas' needs a GPU \\(this backend is 'cpu'\\)"):
    akv.attend(q, ckv, implementation="pallas")
  with pytest.raises(ValueError, match="implementation='triton' is not one of None, 'reference', 'xla', 'pallas'"):
    akv.attend(q, ckv, implementation="triton")
  with pytest.raises(ValueError, match=r"attend\(implementation='pallas'\): the kernel attends one query token"):
    akv.attend(q_obs[:, :, :2], ckv, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match=r"attend\(implementation='pallas'\): the kernel does not return per-slot"):
    akv.attend(q, ckv, implementation="pallas", interpret=True, return_probs=True)
  # "xla" is the chunked path or an error, never the reference in disguise.
  with pytest.raises(ValueError, match=r"attend\(implementation='xla'\): the chunked path attends one query token "
                                       r"per row .* use implementation='reference'"):
    akv.attend(q_obs[:, :, :2], ckv, implementation="xla")
  with pytest.raises(ValueError, match=r"attend\(implementation='xla'\): the chunked path does not return"):
    akv.attend(q, ckv, implementation="xla", return_probs=True)
  with pytest.raises(ValueError, match="the Pallas kernel reads keys quantized per channel \\(KIVI\\); this cache's keys are quantized per 'token'"):
    tok = akv.compress(kv, akv.Policy(key_bits=4, value_bits=4, key_axis="token", key_group=16, value_group=16))
    akv.attend(q, tok, implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="expected a CompressedKV, got DenseKV"):
    akv.attend(q, kv)
  with pytest.raises(ValueError, match=r"k_t must be \[B, K, H\] = \(2, 2, 16\), got shape \(2, 16\)"):
    akv.append(ckv, kv.k[:, 0, 0], kv.v[:, :, 0], pol)
  with pytest.raises(ValueError, match=r"v_t must be \[B, K, H\]"):
    akv.append(akv.compress(kv, pol), kv.k[:, :, 0], kv.v[:, :, 0, :8], pol)
  with pytest.raises(ValueError, match="policy 'streaming' evicts but this cache was not built by an evicting"):
    kivi = akv.Policy(key_bits=2, value_bits=2, key_group=16, value_group=16)
    akv.append(akv.compress(kv, kivi), kv.k[:, :, 0], kv.v[:, :, 0], akv.presets.get("streaming"))
  h2o = akv.Policy(name="h2o", selection="h2o", keep=0.5, recent=8)
  hckv = akv.compress(kv, h2o, queries=q_obs)
  with pytest.raises(ValueError, match=r"probs shape \(2, 2, 3\) does not match the cache's score slots"):
    akv.observe(hckv, jnp.zeros((2, 2, 3)))
  with pytest.raises(ValueError, match="policy 'h2o' has decode rule 'heavy_hitter', which keeps decode-rule "
                                       "state AttentionTotals, but this cache carries no decode-rule state"):
    akv.append(akv.compress(kv, akv.presets.get("streaming")), kv.k[:, :, 0], kv.v[:, :, 0], h2o)
  with pytest.raises(ValueError, match="policy 'streaming' has decode rule 'sliding_window', which keeps no "
                                       "decode-rule state, but this cache carries decode-rule state AttentionTotals"):
    akv.append(hckv, kv.k[:, :, 0], kv.v[:, :, 0], akv.presets.get("streaming"))
  with pytest.raises(ValueError, match="which keeps decode-rule state AttentionTotals, but this cache carries no"):
    akv.observe(akv.compress(kv, akv.presets.get("streaming")), jnp.zeros((2, 2, 3)), h2o)
  with pytest.raises(ValueError, match="but this cache carries no decode-rule state"):
    akv.extend(q_obs[:, :, :2], kv.k[:, :, :2], kv.v[:, :, :2], akv.compress(kv, akv.presets.get("streaming")), h2o)
  with pytest.raises(AttributeError, match=r"CompressedKV.scores moved into the decode rule's state: .*ckv.state.scores"):
    hckv.scores  # noqa: B018 (the old field name fails, naming the new one)


def test_adakv_cap_too_small_for_budget():
  with pytest.raises(ValueError, match="cap"):
    akv.selection.adakv_head_budgets(jnp.zeros((1, 2, 64)), 64, cap=16)


def test_checked_catches_values(kv, q_obs):
  pol = akv.Policy(key_bits=2, value_bits=2, key_group=16, value_group=16)
  compress = akv.checked(akv.compress)
  ckv = compress(kv, pol)           # clean input passes
  assert isinstance(ckv, akv.CompressedKV)
  bad = dataclasses.replace(kv, k=kv.k.at[0, 0, 3, 0].set(jnp.nan))
  with pytest.raises(Exception, match="compress input: k has 1 non-finite values in valid tokens"):
    compress(bad, pol)
  # NaN in padding is not an error: it never enters the cache.
  pad_nan = dataclasses.replace(kv, v=kv.v.at[1, 0, 80, 0].set(jnp.inf))
  compress(pad_nan, pol)
  with pytest.raises(Exception, match=r"compress input: lengths must be in \[0, 96\], got min 50 max 97"):
    compress(dataclasses.replace(kv, lengths=jnp.array([97, 50])), pol)
  attend = akv.checked(akv.attend)
  with pytest.raises(Exception, match=r"attend input: an array argument of shape \(2, 4, 16\) has 1 non-finite"):
    attend(q_obs[:, :, 0].at[0, 0, 0].set(jnp.inf), ckv)
  # Off by default: the unchecked function returns without raising.
  out = akv.attend(q_obs[:, :, 0].at[0, 0, 0].set(jnp.inf), ckv)
  assert out.shape == (B, N, H)
  np.testing.assert_array_equal(np.isfinite(out[1]), True)
