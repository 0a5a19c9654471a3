"""A Llama-family decoder in Flax whose prefill and decode step run on compressed KV caches.

Modules carry the parameters (names follow Hugging Face's, so checkpoints map one to one); what attention does
with K/V is passed in as a function, so one module serves three uses:

  forward      full causal attention over the tokens, no cache;
  prefill      full causal attention, then each layer's K/V compressed by the policy as the pass goes by, with
               the observation-window queries taken from the same pass;
  decode_step  one token per row: its K/V appended to each layer's compressed cache, attention over the cache.

Params are a pytree argument, never static; the config and the policy are static.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import akv_jax as akv
from akv_jax.cache import CompressedKV, DenseKV
from akv_jax import dispatch
from akv_jax.models.config import LlamaConfig, apply_rope, inverse_frequencies
from akv_jax.policy import Policy
from akv_jax.pooled import replace_layer
from pallas_kernels import prefill_scores

# attn_fn(layer, q [B, T, N, H], k [B, T, K, H], v [B, T, K, H]) -> (o [B, T, N, H], aux)
AttnFn = Callable[[int, jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]
_MASKED = -1e30


class RMSNorm(nn.Module):
  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * w).astype(self.dtype)


def _dense(features: int, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, use_bias=False, name=name, dtype=dtype, param_dtype=dtype,
                  kernel_init=nn.initializers.normal(0.02))


class Block(nn.Module):
  config: LlamaConfig

  def setup(self):
    c, dt = self.config, self.config.jnp_dtype
    self.input_layernorm = RMSNorm(c.rms_norm_eps, dt)
    self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, dt)
    self.q_proj = _dense(c.num_heads * c.hd, "q_proj", dt)
    self.k_proj = _dense(c.num_kv_heads * c.hd, "k_proj", dt)
    self.v_proj = _dense(c.num_kv_heads * c.hd, "v_proj", dt)
    self.o_proj = _dense(c.hidden_size, "o_proj", dt)
    self.gate_proj = _dense(c.intermediate_size, "gate_proj", dt)
    self.up_proj = _dense(c.intermediate_size, "up_proj", dt)
    self.down_proj = _dense(c.hidden_size, "down_proj", dt)

  def __call__(self, x: jax.Array, positions: jax.Array, layer: int, attn_fn: AttnFn):
    """x: [B, T, D], positions: i32[B, T]."""
    c = self.config
    b, t, _ = x.shape
    h = self.input_layernorm(x)
    q = apply_rope(self.q_proj(h).reshape(b, t, c.num_heads, c.hd), positions, c)
    # K/V in the cache dtype from the start, so prefill attends to exactly what decoding will read back.
    k = apply_rope(self.k_proj(h).reshape(b, t, c.num_kv_heads, c.hd), positions, c).astype(c.kv_jnp_dtype)
    v = self.v_proj(h).reshape(b, t, c.num_kv_heads, c.hd).astype(c.kv_jnp_dtype)
    o, aux = attn_fn(layer, q, k, v)
    x = x + self.o_proj(o.reshape(b, t, -1).astype(x.dtype))
    h = self.post_attention_layernorm(x)
    x = x + self.down_proj(nn.silu(self.gate_proj(h)) * self.up_proj(h))
    return x, aux


class Llama(nn.Module):
  config: LlamaConfig

  def setup(self):
    c = self.config
    self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.jnp_dtype, param_dtype=c.jnp_dtype,
                                 embedding_init=nn.initializers.normal(0.02))
    self.layers = [Block(c, name=f"layers_{i}") for i in range(c.num_layers)]
    self.norm = RMSNorm(c.rms_norm_eps, c.jnp_dtype)
    if not c.tie_embeddings:
      self.lm_head = _dense(c.vocab_size, "lm_head", c.jnp_dtype)

  def __call__(self, tokens: jax.Array, positions: jax.Array, attn_fn: AttnFn):
    """tokens, positions: i32[B, T] -> (hidden [B, T, D] after the final norm, per-layer aux)."""
    x = self.embed_tokens(tokens)
    aux = []
    for i, layer in enumerate(self.layers):
      x, a = layer(x, positions, i, attn_fn)
      aux.append(a)
    return self.norm(x), tuple(aux)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> f32 logits [..., V]."""
    if self.config.tie_embeddings:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def full_logits(self, tokens: jax.Array, positions: jax.Array, attn_fn: AttnFn) -> jax.Array:
    """Logits of every position (also what `init` traces, so every parameter is created)."""
    return self.logits(self(tokens, positions, attn_fn)[0])


def init_params(config: LlamaConfig, key: jax.Array) -> dict:
  """Random parameters (normal(0.02) matrices, unit norms) for a config."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  model = Llama(config)
  return model.init(key, tokens, tokens, _causal_attn, method=Llama.full_logits)["params"]


# ---------------------------------------------------------------------------------------------- attention fns


# Query tokens per block of the XLA prefill attention: its scores are [B, K, G, block, S'] at a time, never the
# whole [T, S] matrix of every head (8k tokens, batch 4 and 9 heads would be 9.7 GB of f32 scores). 256 was the
# fastest of 128-1024 for SmolLM2's shapes at 4k on a 2-core CPU.
PREFILL_BLOCK = 256


def _causal_attn(layer: int, q, k, v, lengths: jax.Array | None = None, block: int = PREFILL_BLOCK):
  """Dense causal attention of q [B, T, N, H] over k, v [B, T, K, H]; padding keys (>= lengths) masked.

  Queries go `block` at a time, each over the keys up to its block's end only (causality makes the rest zero), so
  peak memory is O(block * T) and the work about half of the full square. On a CPU the softmax's elementwise passes
  over the scores cost more than the two matmuls, so the probabilities are left unnormalized and the division is
  done on the [.., H] outputs instead of the [.., S] scores.
  """
  del layer
  b, t, n, h = q.shape
  kh = k.shape[2]
  qg = (q.astype(jnp.float32) / math.sqrt(h)).reshape(b, t, kh, n // kh, h).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
  kf = k.astype(jnp.float32).transpose(0, 2, 1, 3)                                                   # [B, K, T, H]
  vf = v.astype(jnp.float32).transpose(0, 2, 1, 3)
  outs = []
  for start in range(0, t, block):
    end = min(start + block, t)
    s = jnp.einsum("BKGTH,BKSH->BKGTS", qg[:, :, :, start:end], kf[:, :, :end])
    mask = (jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None])[None, None, None]
    if lengths is not None:
      mask = mask & (jnp.arange(end) < lengths[:, None])[:, None, None, None, :]
    s = jnp.where(mask, s, _MASKED)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = jnp.einsum("BKGTS,BKSH->BKGTH", p, vf[:, :, :end]) / jnp.sum(p, axis=-1, keepdims=True)
    outs.append(o)
  o = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype), None


def _last_queries(q: jax.Array, lengths: jax.Array, t: int) -> jax.Array:
  """Each row's last t queries, q [B, S, N, H] -> [B, N, t, H]; slots before the row's start are zero."""
  idx = lengths[:, None] - t + jnp.arange(t)[None, :]                      # [B, t]
  out = jnp.take_along_axis(q, jnp.clip(idx, 0, q.shape[1] - 1)[:, :, None, None], axis=1)
  out = jnp.where((idx >= 0)[:, :, None, None], out, 0)
  return out.transpose(0, 2, 1, 3)


def _rope_observation(config: LlamaConfig, needs: akv.selection.Needs) -> dict:
  """compress's inv_freq keyword when the scorer reads the rotary frequencies (the same for every layer)."""
  return dict(inv_freq=jnp.asarray(inverse_frequencies(config))) if needs.rope else {}


def _observations(needs: akv.selection.Needs, q, lengths, s: int, votes, rope: dict) -> dict:
  """compress's observation keywords for one layer: the prefill kernel's votes when it computed them, else the
  last queries the scorer asks for, and `rope` (from _rope_observation)."""
  obs = dict(rope)
  if votes is not None:
    obs["votes"] = votes
  elif needs.queries:
    obs["queries"] = _last_queries(q, lengths, min(needs.queries, s))
  return obs


# ---------------------------------------------------------------------------------------------- validation


def _compress_pooled(kvs, observed, policy: Policy, reserve: int, rope: dict):
  """Every layer at once (a budget split across layers: akv.compress_layers), from per-layer DenseKV and the
  observation keywords `_observations` (or prefill_many) gave each layer."""
  return akv.compress_layers(kvs, policy, queries=tuple(o.get("queries") for o in observed),
                             votes=tuple(o.get("votes") for o in observed), reserve=reserve, **rope)


def _check_tokens(config: LlamaConfig, tokens, lengths=None) -> None:
  """Value checks that are possible when the inputs are concrete (outside jit): ids in range, lengths."""
  if isinstance(tokens, jax.core.Tracer):
    return
  arr = np.asarray(tokens)
  bad = arr[(arr < 0) | (arr >= config.vocab_size)]
  if bad.size:
    raise ValueError(f"token id {int(bad[0])} is out of the vocabulary [0, {config.vocab_size})")
  if lengths is not None and not isinstance(lengths, jax.core.Tracer):
    lens = np.asarray(lengths)
    if lens.shape != arr.shape[:1]:
      raise ValueError(f"lengths shape {lens.shape} must be ({arr.shape[0]},) for tokens of shape {arr.shape}")
    if np.any(lens < 1) or np.any(lens > arr.shape[1]):
      raise ValueError(f"lengths {lens.tolist()} must be in [1, {arr.shape[1]}] (the prompt capacity)")


def _check_capacity(config: LlamaConfig, s: int, extra: int = 0) -> None:
  if s + extra > config.max_seq_len:
    raise ValueError(f"prompt capacity {s} plus {extra} new tokens exceeds max_seq_len={config.max_seq_len}")


# ---------------------------------------------------------------------------------------------- public API


@functools.partial(jax.jit, static_argnames=("config",))
def _forward(config: LlamaConfig, params, tokens):
  model = Llama(config)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return model.apply({"params": params}, tokens, positions, _causal_attn, method=Llama.full_logits)


def forward(config: LlamaConfig, params, tokens: jax.Array) -> jax.Array:
  """Logits f32[B, T, V] of tokens i32[B, T] with full causal attention (no cache)."""
  _check_tokens(config, tokens)
  _check_capacity(config, tokens.shape[1])
  return _forward(config, params, tokens)


def _fused_attn(interpret: bool, policy: Policy):
  """Prefill attention through the Pallas flash kernel (pallas_kernels.prefill_scores), same contract.

  For SnapKV and H2O selections the kernel also returns the policy's attention votes from the same pass, so
  compress never recomputes attention from the observation queries.
  """
  def attn(layer, q, k, v, lengths):
    del layer
    needs = policy.needs(q.shape[1])
    window = min(needs.queries, q.shape[1]) if needs.votes == "window" else 0
    h2o = needs.votes == "all"
    o, window_votes, h2o_votes = prefill_scores.prefill_attention(q, k, v, lengths, window=window, h2o=h2o,
                                                                  interpret=interpret)
    return o, window_votes if window else h2o_votes
  return attn


def _prefill_attention(config: LlamaConfig, implementation: str | None, interpret: bool, policy: Policy):
  """The prefill attention function for `implementation` (None: the Pallas kernel on a GPU, XLA elsewhere).

  Resolved by `akv_jax.dispatch.resolve` like every other operation, so one call validates a request for the
  whole model; the kernel needs a power-of-2 head dim of at least 16.
  """
  h = config.hd
  why = None if h >= 16 and not h & (h - 1) else f"the flash kernel needs a power-of-2 head dim >= 16, got {h}"
  impl = dispatch.resolve(implementation, interpret, op="prefill", pallas_why=why)
  return _fused_attn(interpret, policy) if impl == "pallas" else _causal_attn


@functools.partial(jax.jit, static_argnames=("config", "policy", "reserve", "implementation", "interpret"))
def _prefill(config: LlamaConfig, params, tokens, lengths, policy: Policy, reserve: int,
             implementation: str | None = None, interpret: bool = False):
  model = Llama(config)
  b, s = tokens.shape
  lengths = jnp.asarray(lengths, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  needs = policy.needs(s)
  rope = _rope_observation(config, needs)
  causal_attn = _prefill_attention(config, implementation, interpret, policy)

  pooled = policy.budget.pooled_layers

  def attn(layer, q, k, v):
    o, votes = causal_attn(layer, q, k, v, lengths)
    kv = DenseKV(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3), lengths=lengths)
    obs = _observations(needs, q, lengths, s, votes, rope)
    if pooled:   # a budget split across layers is allotted after the pass, once every layer is scored
      return o, (kv, obs)
    return o, akv.compress(kv, policy, layer=layer, num_layers=config.num_layers, reserve=reserve, **obs)

  hidden, cache = model.apply({"params": params}, tokens, positions, attn)
  if pooled:
    cache = _compress_pooled(tuple(kv for kv, _ in cache), tuple(obs for _, obs in cache), policy, reserve, rope)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.apply({"params": params}, last, method=Llama.logits), cache


@functools.partial(jax.jit, static_argnames=("config", "window", "h2o", "all_queries"))
def _capture_for_compress(config: LlamaConfig, params, tokens, lengths, window: int, h2o: bool,
                          all_queries: bool):
  """One prompt pass keeping, per layer, what compress reads: the DenseKV, the last `window` queries, (h2o) the
  H2O votes of all prompt queries, computed here as compress would compute them from the queries, and
  (all_queries) every prompt query, for scorers that read them all and take no votes."""
  model = Llama(config)
  b, s = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))

  def attn(layer, q, k, v):
    o, _ = _causal_attn(layer, q, k, v, lengths)
    kv = DenseKV(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3), lengths=lengths)
    q_obs = _last_queries(q, lengths, min(window, s)) if window else None
    every = _last_queries(q, lengths, s) if h2o or all_queries else None
    votes = akv.selection.h2o_scores(every, kv) if h2o else None
    return o, (kv, q_obs, votes, every if all_queries else None)

  hidden, per_layer = model.apply({"params": params}, tokens, positions, attn)
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return model.apply({"params": params}, last, method=Llama.logits), per_layer


def prefill(config: LlamaConfig, params, tokens: jax.Array, lengths: jax.Array, policy: Policy, *,
            reserve: int = 0, implementation: str | None = None, interpret: bool = False,
            reconstruction: Reconstruction | None = None) -> tuple[jax.Array, tuple[CompressedKV, ...]]:
  """Runs the prompt and compresses every layer's cache as the pass goes by.

  Args:
    tokens: i32[B, S] right-padded prompts; S is the prompt capacity (static).
    lengths: i32[B] prompt lengths.
    policy: static compression policy.
    reserve: tokens decoding will append (static).
    implementation: prefill attention: "reference" or "xla" (both the blocked causal softmax in jnp), "pallas"
      (the flash kernel of pallas_kernels.prefill_scores, no T x T matrix; for scorers that take votes,
      SnapKV/PyramidKV/AdaKV and H2O, it also returns them, so their scores cost no second attention pass),
      or None: Pallas on a GPU, XLA otherwise (akv_jax.dispatch).
    interpret: run the kernel in interpret mode (CPU tests).
    reconstruction: KVzip's reconstruction prompt, for a scorer that asks for that pass (see `prefill_many`,
      which then runs the prefill: the pass needs every layer's full cache before any layer is compressed);
      ignored by every other policy.

  Returns:
    (logits f32[B, V] of each row's last prompt token, cache: one CompressedKV per layer).
  """
  _check_tokens(config, tokens, lengths)
  _check_capacity(config, tokens.shape[1], reserve)
  _prefill_attention(config, implementation, interpret, policy)   # validates the request before tracing
  if policy.needs(tokens.shape[1]).reconstruction is not None:
    # The reconstruction pass needs every layer's full cache first, which prefill_many's pass keeps.
    if implementation == "pallas":
      raise ValueError(f"policy {policy.name!r} scores from a context-reconstruction pass, which runs on the XLA "
                       "path: use implementation='xla' or None")
    logits, (cache,) = prefill_many(config, params, tokens, lengths, (policy,), reserve=reserve,
                                    reconstruction=reconstruction)
    return logits, cache
  return _prefill(config, params, tokens, lengths, policy, reserve, implementation, interpret)


def _check_reconstruction(policies, needs: dict, reconstruction) -> None:
  wanting = [p.name for p in policies if needs[p].reconstruction is not None]
  if wanting and reconstruction is None:
    raise ValueError(f"policy {wanting[0]!r} scores from a context-reconstruction pass (KVzip): pass "
                     "reconstruction=models.Reconstruction.from_chat(encode, chat) (the prompt that asks the model "
                     "to repeat its context)")
  from akv_jax.models.reconstruction import Reconstruction  # noqa: PLC0415 (it builds on Llama, defined here)
  if reconstruction is not None and not isinstance(reconstruction, Reconstruction):
    raise ValueError(f"reconstruction must be a models.Reconstruction, got {type(reconstruction).__name__}")


_capture_jit = jax.jit(_capture_for_compress, static_argnums=(0, 4, 5, 6))


def observe_prompt(config: LlamaConfig, params, tokens: jax.Array, lengths: jax.Array, *,
                   window: int = 32) -> tuple[tuple[DenseKV, ...], tuple[jax.Array, ...]]:
  """The prompt's dense cache and observation queries, per layer: what calibration reads (akv.bit_allocation).

  Args:
    tokens: i32[B, S] right-padded prompts; lengths: i32[B].
    window: observation queries kept per layer: each row's last `window` prompt queries.

  Returns:
    (one DenseKV [B, K, S, H] per layer, one query block [B, N, window, H] per layer).
  """
  _check_tokens(config, tokens, lengths)
  _check_capacity(config, tokens.shape[1])
  if not 1 <= window <= tokens.shape[1]:
    raise ValueError(f"window={window} must be in [1, S={tokens.shape[1]}]")
  _, per_layer = _capture_jit(config, params, tokens, jnp.asarray(lengths, jnp.int32), window, False, False)
  return tuple(kv for kv, *_ in per_layer), tuple(q for _, q, *_ in per_layer)


def prefill_many(config: LlamaConfig, params, tokens: jax.Array, lengths: jax.Array,
                 policies: tuple[Policy, ...], *, reserve: int = 0,
                 reconstruction: Reconstruction | None = None) -> tuple[jax.Array, tuple]:
  """`prefill` for several policies from one forward pass: each layer's K/V is compressed by every policy.

  Question-aware compression reads only the prompt, so the pass is the same for all policies; an evaluation of
  many policies on one prompt pays for it once. The pass keeps every layer's dense K/V and observation queries,
  and each policy's compress runs after it, compiled once per (policy, layer layout) and reused across batches
  (one program holding every policy's compress of every layer would take far longer to compile). Prefill
  attention is the XLA path.

  reconstruction: the prompt of KVzip's context-reconstruction pass (akv_jax.models.reconstruction), needed when a
    policy's scorer asks for one (Needs.reconstruction); the pass runs once per distinct (chunk, sinks), over the
    dense caches this pass kept, and its votes are what that scorer reads.

  Returns:
    (logits f32[B, V] of each row's last prompt token, one cache per policy, in the order given).
  """
  if not isinstance(policies, tuple) or not policies or not all(isinstance(p, Policy) for p in policies):
    raise ValueError(f"policies must be a non-empty tuple of Policy, got {policies!r}")
  _check_tokens(config, tokens, lengths)
  _check_capacity(config, tokens.shape[1], reserve)
  s = tokens.shape[1]
  needs = {pol: pol.needs(s) for pol in policies}
  _check_reconstruction(policies, needs, reconstruction)
  # Every prompt query is kept per layer only for a scorer that reads them all and takes no votes (H2O's
  # votes stand in for its queries).
  reads_all = {pol: n.queries >= s and n.votes != "all" for pol, n in needs.items()}
  window = max((n.queries for pol, n in needs.items() if n.votes != "all" and not reads_all[pol]), default=0)
  h2o = any(n.votes == "all" for n in needs.values())
  lengths = jnp.asarray(lengths, jnp.int32)
  logits, per_layer = _capture_for_compress(config, params, tokens, lengths, window, h2o,
                                            any(reads_all.values()))
  from akv_jax.models import reconstruction as _reconstruction  # noqa: PLC0415 (it builds on Llama, defined here)
  rebuilt = {}
  for spec in dict.fromkeys(n.reconstruction for n in needs.values() if n.reconstruction is not None):
    rebuilt[spec] = _reconstruction.votes(config, params, tuple(x[0] for x in per_layer), tokens, lengths,
                                          reconstruction, spec)
  caches = []
  for pol in policies:
    need = needs[pol]
    rope = _rope_observation(config, need)
    layers, observed = [], []
    for layer, (kv, q_obs, votes, q_all) in enumerate(per_layer):
      if need.reconstruction is not None:
        obs = dict(votes=rebuilt[need.reconstruction][layer])
      elif need.votes == "all":
        obs = dict(votes=votes)
      elif reads_all[pol]:
        obs = dict(queries=q_all)
      elif not need.queries:
        obs = {}
      else:
        obs = dict(queries=q_obs[:, :, q_obs.shape[2] - min(need.queries, s):])
      if pol.budget.pooled_layers:   # allotted across layers below, once every layer is scored
        observed.append(obs)
        continue
      layers.append(akv.compress(kv, pol, layer=layer, num_layers=config.num_layers, reserve=reserve, **obs,
                                 **rope))
    if pol.budget.pooled_layers:
      caches.append(_compress_pooled(tuple(x[0] for x in per_layer), tuple(observed), pol, reserve, rope))
    else:
      caches.append(tuple(layers))
  return logits, tuple(caches)


def _decode(config: LlamaConfig, params, cache, tokens, policy: Policy, implementation: str | None = None,
            interpret: bool = False):
  model = Llama(config)
  positions = cache[0].next_pos[:, None]
  kernels = dict(implementation=implementation, interpret=interpret)
  # Layers are updated in order and each reads the cache as the layers before it left it: a pooled cache's
  # layers share their group's pool (akv_jax.pooled).
  state = [cache]

  def attn(layer, q, k, v):
    c = akv.append(state[0][layer], k[:, 0], v[:, 0], policy, **kernels)
    if policy.decode.accumulates:   # the decode rule's state grows by each step's attention (H2O)
      out, probs = akv.attend(q[:, 0], c, return_probs=True, **kernels)
      c = akv.observe(c, probs, policy)
    else:
      out = akv.attend(q[:, 0], c, **kernels)
    state[0] = replace_layer(state[0], layer, c)
    return out[:, None], None

  hidden, _ = model.apply({"params": params}, tokens[:, None], positions, attn)
  return model.apply({"params": params}, hidden[:, 0], method=Llama.logits), state[0]


_decode_jit = jax.jit(_decode, static_argnames=("config", "policy", "implementation", "interpret"),
                      donate_argnames=("cache",))


def decode_step(config: LlamaConfig, params, cache: tuple[CompressedKV, ...], tokens: jax.Array,
                policy: Policy, *, implementation: str | None = None,
                interpret: bool = False) -> tuple[jax.Array, tuple[CompressedKV, ...]]:
  """One decoding step: tokens i32[B] -> (logits f32[B, V], updated cache). The cache argument is donated.

  implementation / interpret pick the attention and the quantize-on-append path, as in `akv.attend` and
  `akv.append` (akv_jax.dispatch): None (Pallas kernels on a GPU where they apply), "reference", "xla" or
  "pallas", each an error where it cannot run. A policy whose decode rule accumulates attention (H2O) needs the
  per-slot probabilities, which only "reference" (or None) computes.
  """
  _check_tokens(config, tokens)
  _check_cache(config, cache)
  dispatch.check(implementation, interpret)
  return _decode_jit(config, params, cache, tokens, policy, implementation, interpret)


def _extend(config: LlamaConfig, params, cache, tokens, counts, policy: Policy, implementation: str | None = None,
            interpret: bool = False):
  """tokens i32[B, T] over the compressed cache (akv.extend per layer) -> (hidden [B, T, D], cache)."""
  model = Llama(config)
  t = tokens.shape[1]
  positions = cache[0].next_pos[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
  kernels = dict(implementation=implementation, interpret=interpret)
  state = [cache]   # updated layer by layer, as in _decode

  def attn(layer, q, k, v):
    out, c = akv.extend(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                        state[0][layer], policy, counts=counts, **kernels)
    state[0] = replace_layer(state[0], layer, c)
    return out.transpose(0, 2, 1, 3), None

  hidden, _ = model.apply({"params": params}, tokens, positions, attn)
  return hidden, state[0]


@functools.partial(jax.jit, static_argnames=("config", "policy", "implementation", "interpret"),
                   donate_argnames=("cache",))
def _extend_jit(config, params, cache, tokens, counts, policy, implementation=None, interpret=False):
  hidden, cache = _extend(config, params, cache, tokens, counts, policy, implementation, interpret)
  return Llama(config).apply({"params": params}, hidden, method=Llama.logits), cache


def _check_cache(config: LlamaConfig, cache) -> None:
  if len(cache) != config.num_layers:
    raise ValueError(f"cache has {len(cache)} layers, the model {config.num_layers}")


def extend(config: LlamaConfig, params, cache: tuple[CompressedKV, ...], tokens: jax.Array, policy: Policy, *,
           counts: jax.Array | None = None, implementation: str | None = None,
           interpret: bool = False) -> tuple[jax.Array, tuple[CompressedKV, ...]]:
  """Runs T new tokens per row on top of a compressed cache (a question after a context compressed without it).

  Each token attends to every slot of its layer's cache and causally to the tokens before it (akv.extend), then
  the tokens are appended by the policy's decode rule. The cache argument is donated.

  Args:
    tokens: i32[B, T], right-padded; counts: i32[B] real tokens per row (default T).
    policy: the static policy the cache was built with; reserve room for the tokens at prefill.

  Returns:
    (logits f32[B, T, V] of every position (rows' padding positions hold garbage), updated cache).
  """
  _check_tokens(config, tokens, counts)
  _check_cache(config, cache)
  dispatch.check(implementation, interpret)
  b, t = tokens.shape
  counts = jnp.full((b,), t, jnp.int32) if counts is None else jnp.asarray(counts, jnp.int32)
  return _extend_jit(config, params, cache, tokens, counts, policy, implementation, interpret)


@functools.partial(jax.jit, static_argnames=("config", "policy", "implementation", "interpret"),
                   donate_argnames=("cache",))
def _teacher_force(config, params, cache, tokens, policy, implementation=None, interpret=False):
  def body(cache, tok):
    logits, cache = _decode(config, params, cache, tok, policy, implementation, interpret)
    return cache, logits

  cache, logits = jax.lax.scan(body, cache, tokens.T)
  return jnp.moveaxis(logits, 0, 1), cache


def teacher_force(config: LlamaConfig, params, cache: tuple[CompressedKV, ...], tokens: jax.Array,
                  policy: Policy, *, implementation: str | None = None,
                  interpret: bool = False) -> tuple[jax.Array, tuple[CompressedKV, ...]]:
  """Feeds tokens i32[B, L] one decode step at a time (a lax.scan of decode_step) and returns every step's logits.

  Decode-time cache maintenance (KIVI's flush, StreamingLLM and H2O eviction) happens at every step, as in
  generation; this is how a continuation's likelihood under a compressed cache is measured. The cache argument is
  donated.

  Returns:
    (logits f32[B, L, V], where step l predicts the token after tokens[:, l]; the final cache).
  """
  _check_tokens(config, tokens)
  _check_cache(config, cache)
  dispatch.check(implementation, interpret)
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be [B, L], got shape {tokens.shape}")
  return _teacher_force(config, params, cache, tokens, policy, implementation, interpret)


def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _sample_loop(config, params, logits, cache, policy, max_new_tokens, temperature, top_k, stop_tokens, key,
                 implementation, interpret):
  """Samples from logits f32[B, V], then decodes until every row stopped or max_new_tokens were generated."""
  b = logits.shape[0]
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)
  out = jnp.zeros((b, max_new_tokens), jnp.int32)
  done = jnp.zeros((b,), bool)
  count = jnp.zeros((b,), jnp.int32)

  def cond(carry):
    i, done = carry[0], carry[4]
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, logits, cache, out, done, count, key = carry
    key, sub = jax.random.split(key)
    tok = _sample(logits, sub, temperature, top_k)
    tok = jnp.where(done, 0, tok)
    out = out.at[:, i].set(tok)
    count = count + (~done).astype(jnp.int32)
    done = done | jnp.any(tok[:, None] == stops[None, :], axis=-1)
    logits, cache = _decode(config, params, cache, tok, policy, implementation, interpret)
    return i + 1, logits, cache, out, done, count, key

  # Ends as soon as every row has stopped: a short answer does not pay for the longest one allowed. The step after
  # a row's last token is still run (its logits are not used), so the loop body stays one compiled step.
  carry = jax.lax.while_loop(cond, body, (jnp.int32(0), logits, cache, out, done, count, key))
  return carry[3], carry[5], carry[2]


@functools.partial(jax.jit, static_argnames=("config", "policy", "max_new_tokens", "temperature", "top_k",
                                             "stop_tokens", "implementation", "interpret"))
def _generate(config, params, tokens, lengths, policy, max_new_tokens, temperature, top_k, stop_tokens, key,
              implementation=None, interpret=False, suffix=None, suffix_lengths=None):
  reserve = max_new_tokens + (0 if suffix is None else suffix.shape[1])
  logits, cache = _prefill(config, params, tokens, lengths, policy, reserve, implementation, interpret)
  return _continue(config, params, logits, cache, policy, max_new_tokens, temperature, top_k, stop_tokens, key,
                   implementation, interpret, suffix, suffix_lengths)


def _continue(config, params, logits, cache, policy, max_new_tokens, temperature, top_k, stop_tokens, key,
              implementation, interpret, suffix, suffix_lengths):
  if suffix is not None:
    hidden, cache = _extend(config, params, cache, suffix, suffix_lengths, policy, implementation, interpret)
    last = jnp.take_along_axis(hidden, (suffix_lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = Llama(config).apply({"params": params}, last, method=Llama.logits)
  return _sample_loop(config, params, logits, cache, policy, max_new_tokens, temperature, top_k, stop_tokens, key,
                      implementation, interpret)


_continue_jit = jax.jit(_continue, static_argnames=("config", "policy", "max_new_tokens", "temperature", "top_k",
                                                    "stop_tokens", "implementation", "interpret"),
                        donate_argnames=("cache",))


def _check_generation(config, batch, max_new_tokens, temperature, top_k, stop_tokens, suffix, suffix_lengths):
  """Shared checks of generate and generate_from; returns the tokens the cache must make room for."""
  extra = max_new_tokens
  if suffix is not None:
    if suffix_lengths is None:
      raise ValueError("suffix needs suffix_lengths i32[B]")
    _check_tokens(config, suffix, suffix_lengths)
    if suffix.shape[0] != batch:
      raise ValueError(f"suffix batch {suffix.shape[0]} does not match the prompts' {batch}")
    extra += suffix.shape[1]
  elif suffix_lengths is not None:
    raise ValueError("suffix_lengths given without a suffix")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  if top_k < 0 or top_k > config.vocab_size:
    raise ValueError(f"top_k={top_k} must be in [0, {config.vocab_size}]")
  for t in stop_tokens:
    if not 0 <= t < config.vocab_size:
      raise ValueError(f"stop token {t} is out of the vocabulary [0, {config.vocab_size})")
  return extra


def generate_from(config: LlamaConfig, params, logits: jax.Array, cache: tuple[CompressedKV, ...], policy: Policy,
                  max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0, stop_tokens: tuple[int, ...] = (),
                  key: jax.Array | None = None, suffix: jax.Array | None = None,
                  suffix_lengths: jax.Array | None = None, implementation: str | None = None,
                  interpret: bool = False):
  """`generate` from a prefilled cache (say one of `prefill_many`'s): logits f32[B, V] of the last prompt token.

  The cache must have been prefilled with room for the suffix and max_new_tokens (`reserve`); it is donated.
  Returns (new tokens i32[B, max_new_tokens], generated counts i32[B], final cache) as `generate` does.
  """
  _check_cache(config, cache)
  _check_generation(config, logits.shape[0], max_new_tokens, temperature, top_k, stop_tokens, suffix,
                    suffix_lengths)
  dispatch.check(implementation, interpret)
  suffix_lengths = None if suffix_lengths is None else jnp.asarray(suffix_lengths, jnp.int32)
  key = jax.random.key(0) if key is None else key
  return _continue_jit(config, params, logits, cache, policy, max_new_tokens, float(temperature), int(top_k),
                       tuple(stop_tokens), key, implementation, interpret, suffix, suffix_lengths)


def generate(config: LlamaConfig, params, tokens: jax.Array, lengths: jax.Array, policy: Policy,
             max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0, stop_tokens: tuple[int, ...] = (),
             key: jax.Array | None = None, suffix: jax.Array | None = None, suffix_lengths: jax.Array | None = None,
             implementation: str | None = None, interpret: bool = False):
  """Greedy (temperature 0) or temperature / top-k sampling in a lax loop over a compressed cache.

  Args:
    tokens: i32[B, S] right-padded prompts; lengths: i32[B].
    policy: static compression policy; the cache reserves max_new_tokens of room (plus the suffix).
    max_new_tokens: tokens to generate per row (static).
    stop_tokens: ids that end a row (the stop token is included in its output); later slots hold 0.
    suffix: i32[B, T] tokens run after the prompt was compressed (`extend`), with suffix_lengths i32[B]: the
      question-agnostic setting, where the prompt is the context and the suffix the question. None: the whole
      prompt is prefilled (and compressed) at once.
    implementation, interpret: kernels for the prefill (`prefill`) and every decode step (`decode_step`).

  Returns:
    (new tokens i32[B, max_new_tokens], generated counts i32[B], final cache).
  """
  _check_tokens(config, tokens, lengths)
  extra = _check_generation(config, tokens.shape[0], max_new_tokens, temperature, top_k, stop_tokens, suffix,
                            suffix_lengths)
  _check_capacity(config, tokens.shape[1], extra)
  suffix_lengths = None if suffix_lengths is None else jnp.asarray(suffix_lengths, jnp.int32)
  _prefill_attention(config, implementation, interpret, policy)   # validates the request before tracing
  key = jax.random.key(0) if key is None else key
  return _generate(config, params, tokens, lengths, policy, max_new_tokens, float(temperature), int(top_k),
                   tuple(stop_tokens), key, implementation, interpret, suffix, suffix_lengths)


@functools.partial(jax.jit, static_argnames=("config",))
def _capture(config: LlamaConfig, params, tokens, lengths):
  model = Llama(config)
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

  def attn(layer, q, k, v):
    o, _ = _causal_attn(layer, q, k, v, lengths)
    return o, (q, k, v)

  _, qkv = model.apply({"params": params}, tokens, positions, attn)
  return qkv


def capture_qkv(config: LlamaConfig, params, tokens: jax.Array, lengths: jax.Array | None = None):
  """Per-layer post-RoPE (q [B, T, N, H], k [B, T, K, H], v [B, T, K, H]) of a full causal pass, for analysis
  and for building KV artifacts; keys at or beyond `lengths` i32[B] are masked as padding."""
  _check_tokens(config, tokens, lengths)
  _check_capacity(config, tokens.shape[1])
  b, t = tokens.shape
  lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  return _capture(config, params, tokens, lengths)
