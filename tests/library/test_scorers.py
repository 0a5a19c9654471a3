"""The scorer interface: Expected Attention against a plain numpy transcription of its definition, a new scorer
added through the registry and run end to end, and the observation checks."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import models
from akv_jax.selection import ExpectedAttention, Scorer, expected_attention_scores
from akv_jax.testing import random_kv, random_queries

H, N, K = 16, 4, 2


def _rope(x, pos, inv):
  """Half-split rotary rotation of x [T, H] at positions pos [T] (numpy, float64)."""
  ang = pos[:, None] * inv[None, :]
  c, s = np.cos(ang), np.sin(ang)
  x1, x2 = x[:, : H // 2], x[:, H // 2:]
  return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1)


def _numpy_expected_attention(q_pre, keys, values, inv, n_sink, future):
  """The definition, one row: q_pre [N, L, H] pre-RoPE queries, keys/values [K, L, H] (keys post-RoPE)."""
  length = q_pre.shape[1]
  g = N // K
  # The averaged rotation as an explicit H x H matrix: R_p = cos * I + sin * P (rotate-half convention).
  eye, p_mat = np.eye(H), np.zeros((H, H))
  p_mat[H // 2:, : H // 2], p_mat[: H // 2, H // 2:] = np.eye(H // 2), -np.eye(H // 2)
  ang = np.arange(length, length + future)[:, None] * inv[None, :]
  cos, sin = np.concatenate([np.cos(ang)] * 2, 1), np.concatenate([np.sin(ang)] * 2, 1)
  r = np.mean(cos[:, :, None] * eye + sin[:, :, None] * p_mat, axis=0)
  out = np.zeros((K, length))
  for kh in range(K):
    probs = []
    for n in range(kh * g, (kh + 1) * g):
      h = q_pre[n, n_sink:]
      mu = h.mean(0)
      cov = (h - mu).T @ (h - mu) / h.shape[0]
      mu, cov = r @ mu, r @ cov @ r.T
      k = keys[kh, n_sink:]
      logit = k @ mu / math.sqrt(H) + np.einsum("si,ij,sj->s", k, cov, k) / H / 2
      e = np.exp(logit - logit.max())
      probs.append(e / e.sum())
    score = np.mean(probs, axis=0) * np.linalg.norm(values[kh, n_sink:], axis=-1)
    out[kh, n_sink:] = score
  return out


def test_expected_attention_matches_its_definition_on_a_ragged_batch():
  rng = np.random.default_rng(0)
  s, lengths, n_sink, future = 40, (40, 29), 4, 64
  inv = 1.0 / (10000.0 ** (np.arange(0, H, 2) / H))
  q_pre = rng.normal(size=(2, N, s, H))
  keys = rng.normal(size=(2, K, s, H))
  values = rng.normal(size=(2, K, s, H))
  # Row b's queries are its last T = S prompt queries: position lengths[b] - S + t.
  q_post = np.zeros_like(q_pre)
  for b, length in enumerate(lengths):
    for n in range(N):
      q_post[b, n] = _rope(q_pre[b, n], np.arange(length - s, length), inv)
  kv = akv.DenseKV(k=jnp.asarray(keys, jnp.float32), v=jnp.asarray(values, jnp.float32),
                   lengths=jnp.array(lengths, jnp.int32))
  got = np.asarray(expected_attention_scores(jnp.asarray(q_post, jnp.float32), kv, jnp.asarray(inv, jnp.float32),
                                             future=future, n_sink=n_sink))
  for b, length in enumerate(lengths):
    want = _numpy_expected_attention(q_pre[b, :, s - length:], keys[b, :, :length], values[b, :, :length], inv,
                                     n_sink, future)
    np.testing.assert_allclose(got[b, :, n_sink:length], want[:, n_sink:], rtol=2e-4, atol=1e-7)
    assert np.all(got[b, :, :n_sink] == akv.selection.common.SINK_SCORE)
    assert np.all(got[b, :, length:] == -np.inf)


def test_expected_attention_needs_rope_and_all_queries():
  kv = random_kv(0, b=1, k=K, s=64, h=H)
  q = random_queries(1, b=1, n=N, t=64, h=H)
  pol = akv.Policy(scorer=ExpectedAttention(), budget=akv.selection.Uniform(keep=0.5), guards=akv.Guards(recent=8))
  assert pol.scorer.needs(64) == akv.selection.Needs(queries=64, rope=True)
  with pytest.raises(ValueError, match="selection='expected_attention' needs the model's rotary frequencies"):
    akv.compress(kv, pol, queries=q)
  with pytest.raises(ValueError, match=r"inv_freq must be \[H / 2\] = \(8,\), got shape \(4,\)"):
    akv.compress(kv, pol, queries=q, inv_freq=jnp.ones(4))
  with pytest.raises(ValueError, match="selection='expected_attention' needs observation queries"):
    akv.compress(kv, pol, inv_freq=jnp.ones(8))
  ckv = akv.compress(kv, pol, queries=q, inv_freq=jnp.ones(8))
  assert int(ckv.kept_tokens()[0, 0]) == 32


def test_expected_attention_on_the_model_prefill_and_prefill_many_agree():
  config, params = models.load_default()
  tokens = jnp.asarray(np.random.default_rng(1).integers(4, config.vocab_size, (2, 96)), jnp.int32)
  lengths = jnp.array([96, 70], jnp.int32)
  pol = akv.Policy(name="ea", scorer=ExpectedAttention(), budget=akv.selection.Uniform(keep=0.5),
                   guards=akv.Guards(recent=16))
  logits, cache = models.prefill(config, params, tokens, lengths, pol)
  logits_many, (cache_many,) = models.prefill_many(config, params, tokens, lengths, (pol,))
  for a, b in zip(cache, cache_many):
    np.testing.assert_array_equal(np.asarray(a.body_pos), np.asarray(b.body_pos))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_many), rtol=1e-5, atol=1e-5)


def _numpy_kvpress_snapkv(q, keys, window, kernel_size):
  """kvpress SnapKVPress.score, one row, transcribed: q [N, W, H] the last W queries, keys [K, L, H]."""
  n, length = q.shape[0], keys.shape[1]
  g = n // K
  k_rep = np.repeat(keys, g, axis=0)                                        # repeat_kv
  logits = np.einsum("nwh,nlh->nwl", q, k_rep) / math.sqrt(H)
  causal = np.arange(length)[None, :] > (length - window + np.arange(window))[:, None]
  logits = np.where(causal[None], -np.inf, logits)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p = (p / p.sum(-1, keepdims=True))[..., :-window]
  scores = p.mean(axis=1)                                                   # [N, L - W]
  padded = np.pad(scores, ((0, 0), (kernel_size // 2, kernel_size // 2)))  # avg_pool1d, zeros counted
  pooled = np.stack([padded[:, i:i + kernel_size].sum(1) / kernel_size for i in range(length - window)], 1)
  pooled = pooled.reshape(K, g, -1).mean(1)
  return np.concatenate([pooled, np.full((K, window), pooled.max())], axis=1)


def test_snapkv_kvpress_pooling_gives_kvpress_scores_and_kept_set():
  rng = np.random.default_rng(4)
  s, window, kernel_size, lengths = 96, 16, 5, (96, 71)
  keys = rng.normal(size=(2, K, s, H)).astype(np.float32)
  q_all = rng.normal(size=(2, N, s, H)).astype(np.float32)
  q_obs = np.stack([q_all[b, :, length - window:length] for b, length in enumerate(lengths)])
  kv = akv.DenseKV(k=jnp.asarray(keys), v=jnp.asarray(keys), lengths=jnp.array(lengths, jnp.int32))
  got = np.asarray(akv.selection.snapkv_scores(jnp.asarray(q_obs), kv, window=window, kernel_size=kernel_size,
                                               pooling="kvpress"))
  # kvpress keeps int(L * (1 - compression_ratio)) tokens per head by score; so does a policy with no sinks and
  # the window as its bf16 recent band, at the keep that rounds to the same count.
  compression_ratio = 0.75
  pol = akv.Policy(scorer=akv.selection.SnapKV(window=window, kernel_size=kernel_size, pooling="kvpress"),
                   budget=akv.selection.Uniform(keep=int(s * (1 - compression_ratio)) / s),
                   guards=akv.Guards(n_sink=0, recent=window))
  for b, length in enumerate(lengths):
    want = _numpy_kvpress_snapkv(q_obs[b], keys[b, :, :length], window, kernel_size)
    np.testing.assert_allclose(got[b, :, :length], want, rtol=1e-5, atol=1e-7)
    assert np.all(got[b, :, length:] == -np.inf)
  # kvpress sizes its budget from the row's own length (batch 1): compare the kept set of the full-length row.
  want = _numpy_kvpress_snapkv(q_obs[0], keys[0], window, kernel_size)
  ckv = akv.compress(akv.DenseKV(k=kv.k[:1], v=kv.v[:1], lengths=jnp.array([s])), pol,
                     queries=jnp.asarray(q_obs[:1]))
  kept = np.asarray(akv.decompress(ckv).positions[0])
  n_kept = int(s * (1 - compression_ratio))
  for kh in range(K):
    top = np.sort(np.argsort(-want[kh], kind="stable")[:n_kept])
    np.testing.assert_array_equal(np.sort(kept[kh][kept[kh] >= 0]), top)


@dataclasses.dataclass(frozen=True)
class _ValueNorm(Scorer):
  """A toy scorer: keep the tokens whose values are largest (scale^2 per unit of `power`)."""

  name = "test_value_norm"
  power: float = 1.0

  def score(self, kv, obs):
    del obs
    norm = jnp.linalg.norm(kv.v.astype(jnp.float32), axis=-1) ** self.power
    return jnp.where(kv.valid(), norm, -jnp.inf)


@pytest.fixture
def registered_toy():
  akv.selection.register(_ValueNorm)
  yield _ValueNorm
  del akv.selection.SCORERS[_ValueNorm.name]


def test_a_new_scorer_through_the_registry_runs_end_to_end(registered_toy):
  kv = random_kv(3, b=2, k=K, s=64, h=H, lengths=(64, 50))
  pol = akv.Policy(name="toy", selection="test_value_norm", keep=0.5, recent=8)
  assert pol.scorer == registered_toy()
  ckv = akv.compress(kv, pol)
  # The body holds exactly the top-scoring candidates by value norm (sinks and window kept apart).
  norms = np.linalg.norm(np.asarray(kv.v, np.float32), axis=-1)
  lay = pol.layout(64, 0, 1)
  for b, length in enumerate((64, 50)):
    for kh in range(K):
      cand = np.arange(4, max(4, length - lay.recent))
      top = np.sort(cand[np.argsort(-norms[b, kh, cand], kind="stable")[:lay.selected]])
      got = np.asarray(ckv.body_pos[b, kh])[: int(ckv.value_fill[b, kh])]
      np.testing.assert_array_equal(got, top)
  # And on a model, through prefill and decoding.
  config, params = models.load_default()
  tokens = jnp.asarray(np.random.default_rng(2).integers(4, config.vocab_size, (2, 80)), jnp.int32)
  new, counts, cache = models.generate(config, params, tokens, jnp.array([80, 61]), pol, 6)
  assert new.shape == (2, 6) and np.all(np.asarray(counts) == 6)
  assert int(cache[0].key_fill.max() + cache[0].recent_fill.max()) < 80


def test_policy_to_dict_names_every_part():
  d = akv.presets.get("hybrid_12x").to_dict()
  assert d["scorer"]["name"] == "snapkv"
  assert d["budget"] == dict(name="adakv", keep=0.355, target=12, alpha=0.2, cap=3.0)
  assert d["rotation"] is None
  assert d["keys"] == dict(bits=2, group=32, axis="channel", outliers=0) and d["decode"] == dict(name="kivi_residual")
  assert d["guards"]["layers"] == (0,) and d["guards"]["bits"] == 4
