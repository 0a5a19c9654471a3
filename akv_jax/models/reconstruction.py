"""KVzip's context-reconstruction pass: the model repeats its context on top of the full cache, and each context
key's vote is the largest attention a reconstruction query gives it (akv_jax.selection.kvzip).

Axis legend: B batch, T reconstruction tokens, S context capacity, N query heads, K kv heads, G = N / K, H head dim.

For chunk i of the context (tokens [start + i C, start + (i + 1) C) of each row, C = `Reconstruct.chunk`) the model
reads  prompt + suffix + chunk  at positions after the row's context (length + t):
  prompt  "\\n\\nRepeat the previous context exactly." for the first chunk; for later ones "\\n\\nRepeat the part of
          the previous context exactly, starting with" and the last `overlap` tokens of the previous chunk;
  suffix  the end of the user turn and the assistant header, from the chat template.
Every reconstruction query attends, for the hidden states, to the whole context and causally to the tokens before
it, as any forward pass would. Its vote is a second softmax over the same logits restricted to the first `sinks`
context tokens, the chunk and the reconstruction tokens (kvpress's KVzipPress.score_kvzip); the chunk's entries,
maxed over the G query heads and the real queries, are the votes of the chunk's keys. Nothing of the pass enters
the cache. The votes of tokens before `start` (the chat header) stay 0.

Cost: one pass of T = |prompt| + |suffix| + C tokens over S + T keys per chunk, about 2-3x the prefill at 4k.
Positions run past the context by up to T, as in kvpress (beyond the trained context when the context is near it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from akv_jax.cache import DenseKV
from akv_jax.models.config import LlamaConfig
from akv_jax.models.llama import PREFILL_BLOCK, Llama
from akv_jax.selection.base import Reconstruct
from akv_jax.softmax import masked_softmax

FIRST_PROMPT = "\n\nRepeat the previous context exactly."
LATER_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """The reconstruction prompt as token ids of the model's tokenizer.

  Attributes:
    first, later: the prompt before the first chunk and before later ones (FIRST_PROMPT, LATER_PROMPT).
    suffix: what follows the prompt before the chunk: the end of the user turn and the assistant header.
    start: leading tokens of every row that are not context (the chat header before the user text): not
      reconstructed, so they get no votes.
    overlap: tokens of the previous chunk quoted after `later`.
  """

  first: tuple[int, ...]
  later: tuple[int, ...]
  suffix: tuple[int, ...] = ()
  start: int = 0
  overlap: int = 8

  def __post_init__(self):
    for name in ("first", "later", "suffix"):
      ids = getattr(self, name)
      if not isinstance(ids, tuple) or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"Reconstruction.{name} must be a tuple of token ids, got {ids!r}")
    if not self.first or not self.later:
      raise ValueError("Reconstruction.first and .later must not be empty: the model needs to be asked to repeat")
    if self.start < 0 or self.overlap < 0:
      raise ValueError(f"Reconstruction start={self.start} and overlap={self.overlap} must be >= 0")

  @classmethod
  def from_chat(cls, encode: Callable[[str], list[int]], chat: Callable[[str], str] | None, **kw) -> Reconstruction:
    """The prompt for a chat model: encode(text) -> ids (no special tokens added), chat(user text) -> the
    rendered prompt up to the assistant header (None: raw text, suffix "\\n")."""
    if chat is None:
      head, tail = "", "\n"
    else:
      mark = "\x00KVZIP\x00"
      rendered = chat(mark)
      if rendered.count(mark) != 1:
        raise ValueError("chat must render the user text verbatim exactly once")
      head, tail = rendered.split(mark)
    return cls(first=tuple(encode(FIRST_PROMPT)), later=tuple(encode(LATER_PROMPT)), suffix=tuple(encode(tail)),
               start=len(encode(head)) if head else 0, **kw)

  def width(self, chunk: int) -> int:
    """T: tokens of the longest reconstruction input (every chunk is padded to it, so one program serves all)."""
    return max(len(self.first), len(self.later) + self.overlap) + len(self.suffix) + chunk


def _attention(q, k, v, kv: DenseKV, counts, start, end, sinks: int, block: int):
  """One layer of the pass: (o [B, T, N, H], votes f32[B, K, S]).

  q [B, T, N, H], k, v [B, T, K, H]: the reconstruction tokens' (post-RoPE); kv: the layer's context cache
  [B, K, S, H] with lengths i32[B]; counts i32[B] real reconstruction tokens; start, end i32[B] the chunk.
  Queries go `block` at a time through a scan, so the scores held at once are [B, K, G, block, S + T], whatever T.
  """
  b, t, n, h = q.shape
  kh, s = kv.k.shape[1], kv.k.shape[2]
  g = n // kh
  nb = -(-t // block)
  tp = nb * block
  qg = (q.astype(jnp.float32) / math.sqrt(h)).reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)      # [B,K,G,T,H]
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
  blocks = jnp.moveaxis(qg.reshape(b, kh, g, nb, block, h), 3, 0)                                  # [nb,B,K,G,b,H]
  keys = jnp.concatenate([kv.k.astype(jnp.float32), k.astype(jnp.float32).transpose(0, 2, 1, 3)], axis=2)
  values = jnp.concatenate([kv.v.astype(jnp.float32), v.astype(jnp.float32).transpose(0, 2, 1, 3)], axis=2)
  pos = jnp.arange(s)[None, :]
  ctx = pos < kv.lengths[:, None]                                                                    # [B, S]
  chunk = ctx & (pos >= start[:, None]) & (pos < end[:, None])
  # kvpress's sinks: the first min(sinks, start) tokens, so a chunk never counts twice.
  voted = chunk | (ctx & (pos < jnp.minimum(sinks, start)[:, None]))
  real = jnp.arange(t)[None, :] < counts[:, None]                                                    # [B, T]

  def step(votes, xs):
    qb, i = xs                                                     # [B, K, G, block, H], block index
    tq = i * block + jnp.arange(block)                             # query index of each row of the block
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", qb, keys)             # [B, K, G, block, S + T]
    new = (jnp.arange(t)[None, :] <= tq[:, None])[None] & real[:, None, :]                        # [B, block, T]
    mask = jnp.concatenate([jnp.broadcast_to(ctx[:, None, :], (b, block, s)), new], axis=-1)[:, None, None]
    o = jnp.einsum("BKGTS,BKSH->BKGTH", masked_softmax(logits, mask), values)
    vmask = jnp.concatenate([jnp.broadcast_to(voted[:, None, :], (b, block, s)), new], axis=-1)[:, None, None]
    pv = masked_softmax(logits, vmask)[..., :s]
    q_real = (tq[None, :] < counts[:, None])[:, None, None, :, None]                              # [B,1,1,block,1]
    pv = jnp.where(q_real & chunk[:, None, None, None, :], pv, 0.0)
    return jnp.maximum(votes, jnp.max(pv, axis=(2, 3))), o

  votes, outs = jax.lax.scan(step, jnp.zeros((b, kh, s), jnp.float32), (blocks, jnp.arange(nb)))
  o = jnp.moveaxis(outs, 0, 3).reshape(b, kh, g, tp, h)[:, :, :, :t]                             # [B, K, G, T, H]
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype), votes


@functools.partial(jax.jit, static_argnames=("config", "sinks", "block"))
def _chunk_votes(config: LlamaConfig, params, kvs: tuple[DenseKV, ...], tokens, counts, start, end, sinks: int,
                 block: int = PREFILL_BLOCK):
  """Votes f32[B, K, S] per layer from one reconstruction chunk: tokens i32[B, T] (counts i32[B] real) at
  positions after each row's context, reconstructing context tokens [start, end) i32[B]."""
  model = Llama(config)
  lengths = kvs[0].lengths
  positions = lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]

  def attn(layer, q, k, v):
    return _attention(q, k, v, kvs[layer], counts, start, end, sinks, block)

  _, votes = model.apply({"params": params}, tokens, positions, attn)
  return votes


def votes(config: LlamaConfig, params, kvs: tuple[DenseKV, ...], tokens, lengths, prompt: Reconstruction,
          spec: Reconstruct, *, block: int = PREFILL_BLOCK) -> tuple[jax.Array, ...]:
  """KVzip's votes f32[B, K, S] for every layer of a prefilled context.

  Args:
    kvs: each layer's full context cache (DenseKV [B, K, S, H], lengths i32[B]), from the prefill pass.
    tokens: i32[B, S] the context tokens (concrete: the reconstruction inputs are built from them on the host);
      lengths: i32[B].
    prompt: the reconstruction prompt in the model's token ids; spec: chunk size and sinks (the scorer's).
    block: reconstruction queries per step of the pass (peak memory is [B, K, G, block, S + T] scores).
  """
  toks, lens = np.asarray(tokens), np.asarray(lengths)
  b = toks.shape[0]
  c = spec.chunk
  if np.any(lens <= prompt.start):
    raise ValueError(f"lengths {lens.tolist()} must exceed Reconstruction.start={prompt.start}: a row without "
                     "context tokens has nothing to reconstruct")
  # Padded to the longest input any chunk needs (one program for all chunks), never wider than the context.
  width = prompt.width(min(c, int(lens.max()) - prompt.start))
  out = None
  for i in range(-(-int(lens.max() - prompt.start) // c)):
    rows = np.zeros((b, width), np.int32)
    counts, starts, ends = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32)
    for r in range(b):
      lo, hi = prompt.start + i * c, min(prompt.start + (i + 1) * c, int(lens[r]))
      if hi <= lo:          # this row's context ended in an earlier chunk: it reads nothing and gets no votes
        starts[r] = ends[r] = lens[r]
        continue
      quote = prompt.first if i == 0 else prompt.later + tuple(int(x) for x in toks[r, max(lo - prompt.overlap, 0):lo])
      seq = quote + prompt.suffix + tuple(int(x) for x in toks[r, lo:hi])
      rows[r, :len(seq)] = seq
      counts[r], starts[r], ends[r] = len(seq), lo, hi
    got = _chunk_votes(config, params, tuple(kvs), jnp.asarray(rows), jnp.asarray(counts), jnp.asarray(starts),
                       jnp.asarray(ends), spec.sinks, block)
    out = got if out is None else tuple(jnp.maximum(a, g) for a, g in zip(out, got))
  return out
