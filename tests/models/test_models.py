"""The Flax decoder: cached decoding equals the full forward, greedy equivalence, ragged rows, one compile."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import models
from akv_jax.models import llama

CFG = models.LlamaConfig(vocab_size=89, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, max_seq_len=512,
                         rope_scaling=models.RopeScaling(factor=8.0, original_max_position_embeddings=64))
S, NEW = 160, 12


@pytest.fixture(scope="module")
def params():
  return models.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, S + NEW), 1, CFG.vocab_size)


def _small(name):
  pol = akv.presets.fixed(name)
  return dataclasses.replace(pol, recent=min(pol.recent, 32), key_group=16, value_group=16)


def test_cached_decoding_equals_full_forward(params, tokens):
  lengths = jnp.array([S, 101])
  pol = akv.presets.fixed("full")
  logits, cache = models.prefill(CFG, params, tokens[:, :S], lengths, pol, reserve=NEW)
  full = models.forward(CFG, params, tokens)
  np.testing.assert_allclose(logits, full[jnp.arange(2), lengths - 1], rtol=1e-5, atol=1e-5)
  for t in range(NEW):
    logits, cache = models.decode_step(CFG, params, cache, tokens[jnp.arange(2), lengths + t], pol)
    for row in range(2):
      n = int(lengths[row]) + t + 1
      ref = models.forward(CFG, params, tokens[row:row + 1, :n])[0, -1]
      np.testing.assert_allclose(logits[row], ref, rtol=1e-5, atol=1e-5)


def _greedy_reference(params, prompt, steps):
  seq = list(np.asarray(prompt))
  for _ in range(steps):
    logits = models.forward(CFG, params, jnp.asarray([seq]))[0, -1]
    seq.append(int(jnp.argmax(logits)))
  return seq[len(prompt):]


def test_full_policy_generate_equals_uncompressed_greedy(params, tokens):
  lengths = jnp.array([S, 77])
  out, count, _ = models.generate(CFG, params, tokens[:, :S], lengths, akv.presets.fixed("full"), NEW)
  np.testing.assert_array_equal(count, NEW)
  for row in range(2):
    ref = _greedy_reference(params, tokens[row, :int(lengths[row])], NEW)
    np.testing.assert_array_equal(out[row], ref)


@pytest.mark.parametrize("name", ["hybrid_8x", "h2o", "streaming", "hybrid_12x"])
def test_ragged_batch_equals_rows_alone(params, tokens, name):
  pol = _small(name)
  lengths = jnp.array([S, 120])
  out, count, cache = models.generate(CFG, params, tokens[:, :S], lengths, pol, NEW)
  assert int(sum(int(c.dropped.sum()) for c in cache)) == 0
  for row in range(2):
    one, _, _ = models.generate(CFG, params, tokens[row:row + 1, :S], lengths[row:row + 1], pol, NEW)
    np.testing.assert_array_equal(one[0], out[row])


def test_stop_tokens_and_sampling(params, tokens):
  lengths = jnp.array([S, 90])
  greedy, _, _ = models.generate(CFG, params, tokens[:, :S], lengths, akv.presets.fixed("full"), NEW)
  stop = int(greedy[0, 3])
  out, count, _ = models.generate(CFG, params, tokens[:, :S], lengths, akv.presets.fixed("full"), NEW,
                                  stop_tokens=(stop,))
  first = int(np.argmax(np.asarray(greedy[0]) == stop))
  assert int(count[0]) == first + 1 and np.all(np.asarray(out[0, first + 1:]) == 0)
  a, _, _ = models.generate(CFG, params, tokens[:, :S], lengths, akv.presets.fixed("full"), NEW, temperature=1.0,
                            top_k=5, key=jax.random.key(3))
  b, _, _ = models.generate(CFG, params, tokens[:, :S], lengths, akv.presets.fixed("full"), NEW, temperature=1.0,
                            top_k=5, key=jax.random.key(3))
  np.testing.assert_array_equal(a, b)
  assert int(jnp.max(a)) < CFG.vocab_size


def test_decode_step_compiles_once(params, tokens):
  pol = _small("hybrid_8x")
  step = jax.jit(chex.assert_max_traces(llama._decode, n=1), static_argnums=(0, 4), donate_argnums=(2,))
  for lengths in ((S, 100), (64, 159)):
    _, cache = models.prefill(CFG, params, tokens[:, :S], jnp.array(lengths), pol, reserve=NEW)
    for t in range(3):
      _, cache = step(CFG, params, cache, tokens[:, t], pol)


def test_bad_input(params, tokens):
  pol = akv.presets.fixed("full")
  with pytest.raises(ValueError, match="token id 89 is out of the vocabulary"):
    models.forward(CFG, params, tokens.at[0, 3].set(89))
  with pytest.raises(ValueError, match="token id -1 is out of the vocabulary"):
    models.prefill(CFG, params, tokens.at[1, 0].set(-1)[:, :S], jnp.array([S, S]), pol)
  with pytest.raises(ValueError, match=r"prompt capacity 160 plus 400 new tokens exceeds max_seq_len=512"):
    models.generate(CFG, params, tokens[:, :S], jnp.array([S, S]), pol, 400)
  with pytest.raises(ValueError, match=r"prompt capacity 600 plus 0 new tokens exceeds max_seq_len=512"):
    models.forward(CFG, params, jnp.zeros((1, 600), jnp.int32))
  with pytest.raises(ValueError, match=r"lengths \[161, 3\] must be in \[1, 160\]"):
    models.prefill(CFG, params, tokens[:, :S], jnp.array([161, 3]), pol)
  with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
    models.generate(CFG, params, tokens[:, :S], jnp.array([S, S]), pol, 0)
  with pytest.raises(ValueError, match="stop token 500 is out of the vocabulary"):
    models.generate(CFG, params, tokens[:, :S], jnp.array([S, S]), pol, 2, stop_tokens=(500,))
  _, cache = models.prefill(CFG, params, tokens[:, :S], jnp.array([S, S]), pol, reserve=2)
  with pytest.raises(ValueError, match="cache has 1 layers, the model 2"):
    models.decode_step(CFG, params, cache[:1], tokens[:, 0], pol)


def test_blocked_prefill_attention_equals_one_block():
  keys = jax.random.split(jax.random.key(7), 3)
  q = jax.random.normal(keys[0], (2, 300, 4, 16))
  k, v = (jax.random.normal(x, (2, 300, 2, 16)) for x in keys[1:])
  lengths = jnp.array([300, 170])
  whole, _ = llama._causal_attn(0, q, k, v, lengths, block=300)
  for block in (64, 100, 299):
    blocked, _ = llama._causal_attn(0, q, k, v, lengths, block=block)
    np.testing.assert_allclose(blocked, whole, rtol=1e-5, atol=1e-6)


def test_full_policy_extend_equals_full_forward(params, tokens):
  """A context prefilled, then a ragged chunk extended on top: logits at every real chunk position equal the
  uncompressed forward pass of context + chunk."""
  lengths, counts, t = jnp.array([S, 101]), jnp.array([NEW, 5]), NEW
  pol = akv.presets.fixed("full")
  _, cache = models.prefill(CFG, params, tokens[:, :S], lengths, pol, reserve=t)
  chunk = tokens[jnp.arange(2)[:, None], lengths[:, None] + jnp.arange(t)[None, :]]
  logits, cache = models.extend(CFG, params, cache, chunk, pol, counts=counts)
  for row in range(2):
    n, c = int(lengths[row]), int(counts[row])
    ref = models.forward(CFG, params, tokens[row:row + 1, :n + c])[0, n:]
    np.testing.assert_allclose(logits[row, :c], ref, rtol=1e-5, atol=1e-5)
    assert int(cache[0].next_pos[row]) == n + c


@pytest.mark.parametrize("name", ["full", "hybrid_8x"])
def test_generate_with_suffix_equals_prefill_then_extend(params, tokens, name):
  """generate(suffix=...) is prefill of the prompt, extend by the suffix, then greedy decoding; with the full
  policy that is greedy decoding of prompt + suffix."""
  pol = _small(name)
  lengths, counts = jnp.array([S, 120]), jnp.array([7, 3])
  suffix = jax.random.randint(jax.random.key(5), (2, 7), 1, CFG.vocab_size)
  out, _, _ = models.generate(CFG, params, tokens[:, :S], lengths, pol, NEW, suffix=suffix, suffix_lengths=counts)
  _, cache = models.prefill(CFG, params, tokens[:, :S], lengths, pol, reserve=NEW + 7)
  logits, cache = models.extend(CFG, params, cache, suffix, pol, counts=counts)
  logits = logits[jnp.arange(2), counts - 1]
  steps = []
  for _ in range(NEW):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    steps.append(tok)
    logits, cache = models.decode_step(CFG, params, cache, tok, pol)
  np.testing.assert_array_equal(out, jnp.stack(steps, 1))
  if name == "full":
    for row in range(2):
      prompt = jnp.concatenate([tokens[row, :int(lengths[row])], suffix[row, :int(counts[row])]])
      np.testing.assert_array_equal(out[row], _greedy_reference(params, prompt, NEW))


@pytest.mark.parametrize("name", ["full", "kivi2", "streaming"])
def test_teacher_force_equals_decode_steps(params, tokens, name):
  pol = _small(name)
  lengths = jnp.array([S, 130])
  _, cache = models.prefill(CFG, params, tokens[:, :S], lengths, pol, reserve=NEW)
  feed = tokens[jnp.arange(2)[:, None], lengths[:, None] + jnp.arange(NEW)[None, :]]
  logits, _ = models.teacher_force(CFG, params, jax.tree_util.tree_map(jnp.copy, cache), feed, pol)
  for t in range(NEW):
    step, cache = models.decode_step(CFG, params, cache, feed[:, t], pol)
    np.testing.assert_allclose(logits[:, t], step, rtol=1e-5, atol=1e-5)
  if name == "full":
    for row in range(2):
      n = int(lengths[row])
      ref = models.forward(CFG, params, tokens[row:row + 1, :n + NEW])[0, n:]
      np.testing.assert_allclose(logits[row], ref, rtol=1e-5, atol=1e-5)


def test_prefill_many_equals_one_prefill_per_policy(params, tokens):
  pols = tuple(_small(n) for n in ("full", "hybrid_8x", "h2o", "tova", "adakv"))
  lengths = jnp.array([S, 111])
  logits, caches = models.prefill_many(CFG, params, tokens[:, :S], lengths, pols, reserve=NEW)
  assert len(caches) == len(pols)
  for pol, cache in zip(pols, caches):
    one_logits, one = models.prefill(CFG, params, tokens[:, :S], lengths, pol, reserve=NEW)
    np.testing.assert_allclose(logits, one_logits, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(one), strict=True):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-6, atol=1e-6)
  suffix, counts = tokens[:, S:S + 4], jnp.array([4, 2])
  for pol, cache in zip(pols, caches):
    out, count, _ = models.generate_from(CFG, params, logits, cache, pol, 6, suffix=suffix, suffix_lengths=counts)
    want, want_count, _ = models.generate(CFG, params, tokens[:, :S], lengths, pol, 6, suffix=suffix,
                                          suffix_lengths=counts)
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(count, want_count)


def test_bf16_kv_cache_of_an_f32_model(params, tokens):
  """kv_dtype rounds K/V once, where they are made: the cache holds bf16 and prefill attends to the same values."""
  cfg = dataclasses.replace(CFG, kv_dtype="bfloat16")
  lengths = jnp.array([S, 90])
  pol = akv.presets.fixed("full")
  logits, cache = models.prefill(cfg, params, tokens[:, :S], lengths, pol, reserve=NEW)
  _, cache32 = models.prefill(CFG, params, tokens[:, :S], lengths, pol, reserve=NEW)
  assert cache[0].recent_k.dtype == jnp.bfloat16 and cache32[0].recent_k.dtype == jnp.float32
  assert akv.nbytes(cache) < akv.nbytes(cache32)
  logits_step, _ = models.decode_step(cfg, params, cache, tokens[jnp.arange(2), lengths], pol)
  full = models.forward(cfg, params, tokens)
  np.testing.assert_allclose(logits, full[jnp.arange(2), lengths - 1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits_step, full[jnp.arange(2), lengths], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="kv_dtype='float16' must be None, 'float32' or 'bfloat16'"):
    dataclasses.replace(CFG, kv_dtype="float16")


def test_extend_and_suffix_errors(params, tokens):
  pol = akv.presets.fixed("full")
  lengths = jnp.array([S, S])
  with pytest.raises(ValueError, match="suffix needs suffix_lengths"):
    models.generate(CFG, params, tokens[:, :S], lengths, pol, 2, suffix=tokens[:, :4])
  with pytest.raises(ValueError, match="suffix_lengths given without a suffix"):
    models.generate(CFG, params, tokens[:, :S], lengths, pol, 2, suffix_lengths=jnp.array([1, 1]))
  with pytest.raises(ValueError, match="suffix batch 1 does not match the prompts' 2"):
    models.generate(CFG, params, tokens[:, :S], lengths, pol, 2, suffix=tokens[:1, :4], suffix_lengths=jnp.array([4]))
  with pytest.raises(ValueError, match=r"prompt capacity 160 plus 402 new tokens exceeds max_seq_len=512"):
    models.generate(CFG, params, tokens[:, :S], lengths, pol, 400, suffix=tokens[:, :2],
                    suffix_lengths=jnp.array([2, 2]))
  _, cache = models.prefill(CFG, params, tokens[:, :S], lengths, pol, reserve=4)
  with pytest.raises(ValueError, match=r"lengths \[5, 1\] must be in \[1, 4\]"):
    models.extend(CFG, params, cache, tokens[:, :4], pol, counts=jnp.array([5, 1]))
  with pytest.raises(ValueError, match="cache has 1 layers, the model 2"):
    models.extend(CFG, params, cache[:1], tokens[:, :4], pol)
  with pytest.raises(ValueError, match="cache has 1 layers, the model 2"):
    models.teacher_force(CFG, params, cache[:1], tokens[:, :4], pol)
  with pytest.raises(ValueError, match="policies must be a non-empty tuple of Policy"):
    models.prefill_many(CFG, params, tokens[:, :S], lengths, [pol])
  with pytest.raises(ValueError, match="policies must be a non-empty tuple of Policy"):
    models.prefill_many(CFG, params, tokens[:, :S], lengths, ())


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=4, num_kv_heads=3), "num_heads=4 must be a multiple of num_kv_heads=3"),
    (dict(hidden_size=30, num_heads=4), "hidden_size=30 is not divisible by num_heads=4"),
    (dict(num_layers=0), "num_layers=0 must be >= 1"),
    (dict(dtype="float16"), "dtype='float16' must be 'float32' or 'bfloat16'"),
    (dict(head_dim=7), "head_dim=7 must be even"),
])
def test_config_errors(kwargs, match):
  base = dict(vocab_size=10, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2)
  with pytest.raises(ValueError, match=match):
    models.LlamaConfig(**{**base, **kwargs})


def test_llama3_rope_scaling_bands():
  cfg = dataclasses.replace(CFG, rope_scaling=models.RopeScaling(factor=8.0, original_max_position_embeddings=64))
  plain = models.inverse_frequencies(dataclasses.replace(CFG, rope_scaling=None))
  scaled = models.inverse_frequencies(cfg)
  wavelen = 2 * np.pi / plain
  np.testing.assert_allclose(scaled[wavelen < 16], plain[wavelen < 16])          # short wavelengths kept
  np.testing.assert_allclose(scaled[wavelen > 64], plain[wavelen > 64] / 8.0)    # long ones stretched
  with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor"):
    models.RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import dataclasses, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    import akv_jax as akv
    from akv_jax import models
    cfg = models.LlamaConfig(vocab_size=89, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, head_dim=16,
                             num_kv_heads=4, max_seq_len=512)
    params = models.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 140), 1, 89)
    lengths = jnp.array([128, 100, 77, 128])
    pol = dataclasses.replace(akv.presets.fixed("{name}"), recent=16, window=16, key_group=16, value_group=16)
    ref_logits, ref_cache = models.prefill(cfg, params, tokens[:, :128], lengths, pol, reserve=8)
    ref_step, _ = models.decode_step(cfg, params, ref_cache, tokens[:, 130], pol)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    sp = models.shard_params(params, mesh)
    logits, cache = models.prefill(cfg, sp, models.shard_batch(tokens[:, :128], mesh),
                                   models.shard_batch(lengths, mesh), pol, reserve=8)
    cache = models.shard_cache(cache, mesh)
    step, cache = models.decode_step(cfg, sp, cache, models.shard_batch(tokens[:, 130], mesh), pol)
    assert len(jax.devices()) == 8
    assert cache[0].sink_k.sharding.spec[:2] == ("data", "model"), cache[0].sink_k.sharding
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(step, ref_step, rtol=1e-5, atol=1e-5)
    print("sharded ok")
""")


@pytest.mark.parametrize("name", ["hybrid_8x", "adakv", "adaptive"])
def test_sharded_equals_unsharded_on_8_cpu_devices(name):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  proc = subprocess.run([sys.executable, "-c", SHARDED.replace("{name}", name)], capture_output=True, text=True,
                        env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "sharded ok" in proc.stdout


def test_prefill_kernel_request_for_a_head_dim_it_cannot_take():
  """implementation= is resolved by akv_jax.dispatch for prefill as everywhere: an explicit kernel request the
  kernel cannot serve is an error naming why, never a quiet switch to the XLA path."""
  cfg = dataclasses.replace(CFG, head_dim=24)
  p = models.init_params(cfg, jax.random.key(0))
  toks = jnp.ones((1, 8), jnp.int32)
  with pytest.raises(ValueError, match=r"prefill\(implementation='pallas'\): the flash kernel needs a power-of-2 "
                                       r"head dim >= 16, got 24"):
    models.prefill(cfg, p, toks, jnp.array([8]), akv.presets.fixed("full"), implementation="pallas", interpret=True)
  with pytest.raises(ValueError, match="implementation='pallas' needs a GPU"):
    models.prefill(cfg, p, toks, jnp.array([8]), akv.presets.fixed("full"), implementation="pallas")
  logits, _ = models.prefill(cfg, p, toks, jnp.array([8]), akv.presets.fixed("full"))   # None: the XLA path here
  assert logits.shape == (1, cfg.vocab_size)


def test_observe_prompt_gives_the_cache_and_queries_compress_reads(params, tokens):
  """observe_prompt's per-layer DenseKV is the cache the full policy keeps, and SnapKV compressing it with the
  returned queries holds what prefill's SnapKV holds (the same pass, the same observation window)."""
  lengths = jnp.array([S, S - 37], jnp.int32)
  kvs, qs = models.observe_prompt(CFG, params, tokens[:, :S], lengths, window=16)
  assert len(kvs) == len(qs) == CFG.num_layers and qs[0].shape == (2, CFG.num_heads, 16, 16)
  np.testing.assert_array_equal(kvs[0].lengths, lengths)
  snap = dataclasses.replace(akv.presets.get("snapkv"), window=16, recent=16)
  _, cache = models.prefill(CFG, params, tokens[:, :S], lengths, snap)
  for layer, (kv, q) in enumerate(zip(kvs, qs)):
    ours = akv.compress(kv, snap, queries=q, layer=layer, num_layers=CFG.num_layers)
    np.testing.assert_array_equal(akv.decompress(ours).positions, akv.decompress(cache[layer]).positions)
  with pytest.raises(ValueError, match=r"window=0 must be in \[1, S=160\]"):
    models.observe_prompt(CFG, params, tokens[:, :S], lengths, window=0)
