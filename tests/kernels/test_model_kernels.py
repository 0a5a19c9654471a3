"""The model's prefill through the Pallas flash kernel == through XLA (interpret mode on CPU), and dispatch errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import models

INTERPRET = jax.default_backend() != "gpu"


def _must_not_run(*args, **kwargs):
  raise AssertionError("selection scores were recomputed from queries although the kernel returned votes")


@pytest.mark.parametrize("preset", ["full", "kivi2", "snapkv", "h2o", "pyramidkv", "adakv", "hybrid_8x"])
def test_prefill_pallas_matches_xla(preset, monkeypatch):
  config = models.LlamaConfig(vocab_size=50, hidden_size=128, intermediate_size=96, num_layers=2, num_heads=4,
                              num_kv_heads=2, max_seq_len=256)
  params = models.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 160), 0, 50)
  lengths = jnp.array([160, 97], jnp.int32)
  pol = akv.presets.fixed(preset)
  pol = dataclasses.replace(pol, recent=min(pol.recent, 32))   # guard bands that fit 160 tokens
  want_logits, want = models.prefill(config, params, tokens, lengths, pol, implementation="xla")
  # The kernel's votes replace SnapKV's and H2O's second attention pass: computing them from queries now fails.
  for name in ("snapkv_scores", "h2o_scores"):
    monkeypatch.setattr(akv.selection, name, _must_not_run)
  got_logits, got = models.prefill(config, params, tokens, lengths, pol, implementation="pallas",
                                   interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=2e-4, atol=2e-4)
  for a, b in zip(got, want):   # the same tokens are kept
    np.testing.assert_array_equal(np.asarray(akv.decompress(a).positions), np.asarray(akv.decompress(b).positions))
  q = jax.random.normal(jax.random.key(2), (2, 4, 32))
  for a, b in zip(got, want):   # the caches answer attention alike (codes may differ by one step at ties)
    np.testing.assert_allclose(np.asarray(akv.attend(q, a)), np.asarray(akv.attend(q, b)), rtol=1e-2, atol=1e-2)


def test_prefill_implementation_errors():
  config = models.LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                              num_kv_heads=2, max_seq_len=64)
  params = models.init_params(config, jax.random.key(0))
  tokens, lengths = jnp.zeros((1, 8), jnp.int32), jnp.array([8], jnp.int32)
  with pytest.raises(ValueError, match="implementation='cudnn' is not one of None, 'reference', 'xla', 'pallas'"):
    models.prefill(config, params, tokens, lengths, akv.presets.fixed("full"), implementation="cudnn")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="implementation='pallas' needs a GPU"):
      models.prefill(config, params, tokens, lengths, akv.presets.fixed("full"), implementation="pallas")


@pytest.mark.parametrize("preset", ["kivi2", "hybrid_8x", "snapkv"])
def test_decode_step_pallas_matches_xla(preset):
  """Decoding through the fused attention and quantize-on-append kernels tracks the XLA path step by step."""
  config = models.LlamaConfig(vocab_size=50, hidden_size=256, intermediate_size=96, num_layers=2, num_heads=4,
                              num_kv_heads=2, max_seq_len=256)
  params = models.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 160), 0, 50)
  lengths = jnp.array([160, 97], jnp.int32)
  pol = dataclasses.replace(akv.presets.fixed(preset), recent=32, key_group=16, value_group=16)
  steps = np.asarray(jax.random.randint(jax.random.key(2), (24, 2), 0, 50))   # teacher-forced inputs
  logits = {}
  for impl in ("xla", "pallas"):
    _, cache = models.prefill(config, params, tokens, lengths, pol, reserve=24, implementation="xla")
    out = []
    for t in range(steps.shape[0]):   # 24 steps: whole key groups leave the window (quantize-on-append)
      step_logits, cache = models.decode_step(config, params, cache, jnp.asarray(steps[t]), pol,
                                              implementation=impl, interpret=INTERPRET)
      out.append(np.asarray(step_logits))
    logits[impl] = np.stack(out)
  np.testing.assert_allclose(logits["pallas"], logits["xla"], rtol=2e-3, atol=2e-3)


def test_generate_pallas_matches_xla():
  config = models.LlamaConfig(vocab_size=50, hidden_size=256, intermediate_size=96, num_layers=2, num_heads=4,
                              num_kv_heads=2, max_seq_len=256)
  params = models.init_params(config, jax.random.key(3))
  tokens = jax.random.randint(jax.random.key(4), (2, 160), 0, 50)
  lengths = jnp.array([160, 120], jnp.int32)
  pol = dataclasses.replace(akv.presets.fixed("hybrid_8x"), recent=32, key_group=16, value_group=16)
  want, _, _ = models.generate(config, params, tokens, lengths, pol, 8, implementation="xla")
  got, _, _ = models.generate(config, params, tokens, lengths, pol, 8, implementation="pallas", interpret=INTERPRET)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_decode_implementation_errors():
  config = models.LlamaConfig(vocab_size=50, hidden_size=128, intermediate_size=96, num_layers=1, num_heads=2,
                              num_kv_heads=1, max_seq_len=64)
  params = models.init_params(config, jax.random.key(0))
  tokens, lengths = jnp.zeros((1, 16), jnp.int32), jnp.array([16], jnp.int32)
  pol = dataclasses.replace(akv.presets.fixed("kivi2"), recent=8, key_group=8, value_group=8)
  _, cache = models.prefill(config, params, tokens, lengths, pol, reserve=4)
  # "reference" means the same in decode_step as in attend and quantize: the plain definitions.
  copy = jax.tree_util.tree_map(jnp.copy, cache)   # decode_step donates its cache
  ref, _ = models.decode_step(config, params, copy, jnp.zeros((1,), jnp.int32), pol, implementation="reference")
  copy = jax.tree_util.tree_map(jnp.copy, cache)
  xla, _ = models.decode_step(config, params, copy, jnp.zeros((1,), jnp.int32), pol, implementation="xla")
  np.testing.assert_allclose(np.asarray(ref), np.asarray(xla), rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="implementation='cudnn' is not one of None, 'reference', 'xla', 'pallas'"):
    models.generate(config, params, tokens, lengths, pol, 2, implementation="cudnn")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="implementation='pallas' needs a GPU"):
      models.decode_step(config, params, cache, jnp.zeros((1,), jnp.int32), pol, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='pallas' needs a GPU"):
      models.generate(config, params, tokens, lengths, pol, 2, implementation="pallas")
