"""KVzip: the context-reconstruction pass's votes against a plain numpy transcription of the definition, on a
small random model; the scorer end to end through prefill_many; every error path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import models
from akv_jax.models import reconstruction as rec

CFG = models.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=6, head_dim=16,
                         num_kv_heads=2, max_seq_len=512)
PROMPT = models.Reconstruction(first=(11, 12, 13), later=(21, 22), suffix=(31, 32), start=3, overlap=2)
SPEC = akv.selection.Reconstruct(chunk=16, sinks=2)
S = 48


@pytest.fixture(scope="module")
def params():
  return models.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, S), 1, CFG.vocab_size)


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _numpy_votes(params, row, n, prompt, spec):
  """The definition, one row: for each chunk, run the model on context + reconstruction input with plain causal
  attention (capture_qkv), and for every reconstruction query take the softmax over the first min(sinks, start)
  tokens, the chunk and the reconstruction tokens up to itself; a chunk key's vote is its largest weight over the
  query heads of its kv head and the queries."""
  votes = np.zeros((CFG.num_layers, CFG.num_kv_heads, S))
  g = CFG.num_heads // CFG.num_kv_heads
  for i, lo in enumerate(range(prompt.start, n, spec.chunk)):
    hi = min(lo + spec.chunk, n)
    quote = prompt.first if i == 0 else prompt.later + tuple(row[max(lo - prompt.overlap, 0):lo])
    seq = list(row[:n]) + list(quote + prompt.suffix) + list(row[lo:hi])
    per_layer = models.capture_qkv(CFG, params, jnp.asarray([seq], jnp.int32))
    t0 = n                                     # the first reconstruction token
    keys_at = list(range(min(spec.sinks, lo))) + list(range(lo, hi))
    for layer, (q, k, _) in enumerate(per_layer):
      q, k = np.asarray(q[0], np.float64), np.asarray(k[0], np.float64)      # [T, N, H], [T, K, H]
      for head in range(CFG.num_heads):
        kh = head // g
        for t in range(t0, len(seq)):
          cols = keys_at + list(range(t0, t + 1))
          w = _softmax(q[t, head] @ k[cols, kh].T / np.sqrt(CFG.hd))
          for j, pos in enumerate(keys_at):
            if pos >= lo:
              votes[layer, kh, pos] = max(votes[layer, kh, pos], w[j])
  return votes


def _dense_kvs(params, tokens, lengths):
  return tuple(akv.DenseKV(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3), lengths=lengths)
               for _, k, v in models.capture_qkv(CFG, params, tokens, lengths))


def test_votes_match_the_definition_on_ragged_rows(params, tokens):
  lengths = jnp.array([S, 37], jnp.int32)
  got = rec.votes(CFG, params, _dense_kvs(params, tokens, lengths), tokens, lengths, PROMPT, SPEC)
  # Queries a few at a time (the scan over query blocks, with a padded last block) give the same votes.
  small = rec.votes(CFG, params, _dense_kvs(params, tokens, lengths), tokens, lengths, PROMPT, SPEC, block=7)
  for a, c in zip(got, small):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-7)
  assert len(got) == CFG.num_layers and got[0].shape == (2, CFG.num_kv_heads, S)
  for r in range(2):
    want = _numpy_votes(params, np.asarray(tokens[r]).tolist(), int(lengths[r]), PROMPT, SPEC)
    np.testing.assert_allclose(np.stack([np.asarray(v[r]) for v in got]), want, rtol=2e-4, atol=1e-6)
  # The chat header gets no votes; a row's padding none either.
  assert np.all(np.asarray(got[0][:, :, :PROMPT.start]) == 0)
  assert np.all(np.asarray(got[1][1, :, 37:]) == 0)
  assert np.all(np.asarray(got[1][0, :, PROMPT.start:]) > 0)


def test_kvzip_policy_keeps_the_top_voted_tokens_end_to_end(params, tokens):
  lengths = jnp.array([S, 40], jnp.int32)
  pol = akv.Policy(name="kvzip_uniform", scorer=akv.selection.KVzip(chunk=16, sinks=2),
                   budget=akv.selection.Uniform(keep=0.5), guards=akv.Guards(n_sink=2, recent=4))
  logits, (cache,) = models.prefill_many(CFG, params, tokens, lengths, (pol,), reconstruction=PROMPT, reserve=4)
  votes = rec.votes(CFG, params, _dense_kvs(params, tokens, lengths), tokens, lengths, PROMPT, pol.needs(S).reconstruction)
  ref = akv.compress(_dense_kvs(params, tokens, lengths)[1], pol, votes=votes[1], layer=1, num_layers=2, reserve=4)
  np.testing.assert_array_equal(akv.decompress(cache[1]).positions, akv.decompress(ref).positions)
  # prefill runs the same pass for a single policy, and the cache decodes.
  logits1, cache1 = models.prefill(CFG, params, tokens, lengths, pol, reserve=4, reconstruction=PROMPT)
  np.testing.assert_allclose(logits1, logits, rtol=1e-6)
  np.testing.assert_array_equal(akv.decompress(cache1[0]).positions, akv.decompress(cache[0]).positions)
  out, counts, _ = models.generate_from(CFG, params, logits1, cache1, pol, 3)
  assert out.shape == (2, 3)
  # The kvzip preset (AdaKV budgets across heads) runs the same way.
  preset = dataclasses.replace(akv.presets.get("kvzip"), recent=4)
  models.prefill_many(CFG, params, tokens, lengths, (preset, pol), reconstruction=PROMPT)


def test_reconstruction_from_chat():
  def encode(s):
    return [ord(c) % 90 + 1 for c in s]
  prompt = models.Reconstruction.from_chat(encode, lambda u: f"<h>{u}</u><a>")
  assert prompt.first == tuple(encode(rec.FIRST_PROMPT)) and prompt.later == tuple(encode(rec.LATER_PROMPT))
  assert prompt.suffix == tuple(encode("</u><a>")) and prompt.start == 3
  raw = models.Reconstruction.from_chat(encode, None)
  assert raw.start == 0 and raw.suffix == tuple(encode("\n"))
  with pytest.raises(ValueError, match="chat must render the user text verbatim exactly once"):
    models.Reconstruction.from_chat(encode, lambda u: "no user text")


def test_kvzip_errors(params, tokens):
  lengths = jnp.array([S, 40], jnp.int32)
  pol = akv.presets.get("kvzip")
  with pytest.raises(ValueError, match=r"policy 'kvzip' scores from a context-reconstruction pass \(KVzip\): pass "
                                       r"reconstruction=models.Reconstruction"):
    models.prefill_many(CFG, params, tokens, lengths, (pol,))
  with pytest.raises(ValueError, match="policy 'kvzip' scores from a context-reconstruction pass"):
    models.prefill(CFG, params, tokens, lengths, pol)
  with pytest.raises(ValueError, match="reconstruction must be a models.Reconstruction, got tuple"):
    models.prefill_many(CFG, params, tokens, lengths, (pol,), reconstruction=(1, 2))
  with pytest.raises(ValueError, match="runs on the XLA path: use implementation='xla' or None"):
    models.prefill(CFG, params, tokens, lengths, pol, implementation="pallas", interpret=True, reconstruction=PROMPT)
  kv = _dense_kvs(params, tokens, lengths)[0]
  pol = dataclasses.replace(pol, recent=4)
  with pytest.raises(ValueError, match=r"selection='kvzip' scores from a context-reconstruction pass of the model: "
                                       r"pass its votes=\[B, K, S\]"):
    akv.compress(kv, pol)
  with pytest.raises(ValueError, match=r"votes must be \[B, K, S\] = \(2, 2, 48\)"):
    akv.compress(kv, pol, votes=jnp.zeros((2, 2, 5)))
  with pytest.raises(ValueError, match=r"lengths \[48, 3\] must exceed Reconstruction.start=3"):
    rec.votes(CFG, params, _dense_kvs(params, tokens, jnp.array([S, 3])), tokens, jnp.array([S, 3]), PROMPT, SPEC)
  with pytest.raises(ValueError, match="kvzip chunk=0 must be an int >= 1"):
    akv.selection.KVzip(chunk=0)
  with pytest.raises(ValueError, match="kvzip sinks=-1 must be an int >= 0"):
    akv.selection.KVzip(sinks=-1)
  with pytest.raises(ValueError, match=r"Reconstruction.first must be a tuple of token ids, got \[1\]"):
    models.Reconstruction(first=[1], later=(2,))
  with pytest.raises(ValueError, match="Reconstruction.first and .later must not be empty"):
    models.Reconstruction(first=(), later=(2,))
  with pytest.raises(ValueError, match="Reconstruction start=-1 and overlap=8 must be >= 0"):
    models.Reconstruction(first=(1,), later=(2,), start=-1)
