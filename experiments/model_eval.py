"""End-to-end evaluation of a compression policy on a model: task accuracy, KV bytes held, decode speed.

Everything a run compares is measured on identical inputs: the baseline and the policy see the same prompts
(drawn once per task and length from the config's seed), and speed is timed on the same batches.

- Accuracy: greedy generation (models.generate) with the policy's cache, scored by each task's rule
  (akv_jax.tasks), per task and prompt length; "average" is the unweighted mean over tasks, as RULER reports it.
- Memory: bytes of the arrays the prefill cache holds (akv.nbytes over every layer), per prompt batch, and the
  bytes a dense cache of the same prompts would hold in the model's dtype; the ratio is dense / held.
- Speed: TTFT = one jitted prefill of a batch (compressing every layer), TPOT = mean of `decode_steps` jitted decode
  steps, tokens/s = batch / TPOT; each after a warm-up call, synchronized with block_until_ready.
- Peak device memory: the backend's `peak_bytes_in_use` where it reports one (GPUs), else None.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import akv_jax as akv
from akv_jax import models, tasks


@dataclasses.dataclass(frozen=True)
class Prompts:
  """One task batch at one length: what every policy of a run is evaluated on."""

  task: str
  length: int
  batch: tasks.Batch


def draw_prompts(task_names, lengths, samples: int, batch: int, seed: int) -> list[Prompts]:
  """samples prompts per (task, length), in batches of at most `batch` rows, from one seeded generator."""
  vocab = tasks.Vocab()
  rng = np.random.default_rng(seed)
  out = []
  for length in lengths:
    for name in task_names:
      for start in range(0, samples, batch):
        n = min(batch, samples - start)
        out.append(Prompts(name, length, tasks.make_batch(name, rng, length, vocab, n)))
  return out


class TextTasks:
  """The tasks rendered as text for a checkpoint with its own tokenizer (a Hugging Face Llama, say).

  A prompt becomes its readable names ("<niah_single> w5 KEY k3 v1 v7 ... QUERY k3", see
  akv_jax.tasks.Vocab.describe) encoded by the tokenizer; a generation is decoded to text, read back name by name
  up to the first that is not in the task vocabulary (or "<eos>", or a stop token), and scored by the task's rule.
  """

  def __init__(self, tokenizer, stop_tokens: tuple[int, ...]):
    self.tokenizer = tokenizer
    self.stop_tokens = stop_tokens
    self.vocab = tasks.Vocab()

  def encode(self, batch: tasks.Batch, pad_to: int = 64):
    """Prompts -> (tokens i32[B, S'], lengths i32[B]); S' rounded up to pad_to so few shapes compile."""
    rows = [self.tokenizer.encode(self.vocab.describe(p[1:n])).ids for p, n in zip(batch.prompts, batch.lengths)]
    width = -(-max(len(r) for r in rows) // pad_to) * pad_to
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      out[i, :len(r)] = r
    return jnp.asarray(out), jnp.asarray([len(r) for r in rows], jnp.int32)

  def decode(self, generated: np.ndarray) -> np.ndarray:
    """Generated ids [A'] -> task-vocabulary ids, EOS last."""
    ids = [int(t) for t in generated]
    for i, t in enumerate(ids):
      if t in self.stop_tokens:
        ids = ids[:i]
        break
    out = []
    for name in self.tokenizer.decode(ids).split():
      if name == "<eos>":
        break
      try:
        out.extend(self.vocab.encode(name).tolist())
      except ValueError:
        break
    return np.asarray(out + [tasks.vocab.EOS], np.int32)

  def max_new_tokens(self, answer_tokens: int) -> int:
    # A task name ("v17", "SEP") takes a few tokenizer tokens; leave room for 4 each.
    return 4 * answer_tokens + 4


def cast_model(config: models.LlamaConfig, params, dtype: str):
  """The model in `dtype` (activations, parameters and so the KV cache)."""
  if config.dtype == dtype:
    return config, params
  target = jnp.dtype(dtype)
  return (dataclasses.replace(config, dtype=dtype),
          jax.tree_util.tree_map(lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params))


def dense_cache_bytes(config: models.LlamaConfig, batch: int, length: int) -> int:
  """Bytes of an uncompressed K and V cache of `batch` prompts of `length` tokens in the model's dtype."""
  itemsize = jnp.dtype(config.dtype).itemsize
  return 2 * config.num_layers * batch * config.num_kv_heads * length * config.hd * itemsize


def accuracy(config, params, policy: akv.Policy, prompts: list[Prompts], *, progress: bool = True,
             text: TextTasks | None = None) -> dict:
  """Per length: per-task accuracy and average; plus bytes held / dense bytes summed over the prompt batches.

  text: for a model with its own tokenizer, how prompts are rendered and generations read back.
  """
  max_new = max(tasks.get_task(p.task).max_answer_length() for p in prompts)
  stops = (tasks.vocab.EOS,)
  if text is not None:
    max_new, stops = text.max_new_tokens(max_new), text.stop_tokens
  preds: dict[int, list] = {}
  held = dense = 0
  shape_bytes: dict[tuple, int] = {}
  for p in tqdm(prompts, desc=f"{policy.name}: tasks", disable=not progress, mininterval=5):
    if text is None:
      toks, lens = jnp.asarray(p.batch.prompts), jnp.asarray(p.batch.lengths)
    else:
      toks, lens = text.encode(p.batch)
    gen, _, _ = models.generate(config, params, toks, lens, policy, max_new, stop_tokens=stops)
    if text is not None:
      rows = [text.decode(r) for r in np.asarray(gen)]
      gen = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
      for i, r in enumerate(rows):
        gen[i, :len(r)] = r
    # Storage is static-shaped, so the shapes of a prefill's cache give exactly the bytes a real one holds;
    # batches of one shape hold the same bytes, so each shape is traced once.
    if toks.shape not in shape_bytes:
      shape_bytes[toks.shape] = akv.nbytes(
          jax.eval_shape(lambda t, n: models.prefill(config, params, t, n, policy)[1], toks, lens))
    held += shape_bytes[toks.shape]
    dense += dense_cache_bytes(config, toks.shape[0], toks.shape[1])
    preds.setdefault(p.length, []).append((np.asarray(gen), p.batch.samples))
  per_length = {}
  for length, items in preds.items():
    rows = np.concatenate([g for g, _ in items])
    samples = [s for _, ss in items for s in ss]
    per_length[str(length)] = tasks.score_batch(rows, samples)
  return dict(accuracy=per_length, bytes_held=int(held), dense_bytes=int(dense),
              compression_ratio=round(dense / held, 3))


def _median_ms(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def time_prefill_decode(config, params, tokens: jax.Array, lengths: jax.Array, policy: akv.Policy, *,
                        decode_steps: int, reps: int, reconstruction: models.Reconstruction | None = None) -> dict:
  """TTFT and TPOT of one batch, after warm-up: the median of `reps` jitted prefills (which compress every layer;
  the first, compiling call is reported apart as first_call_s) and the mean of decode_steps - 1 greedy steps
  after a warm-up step, with the bytes the prefill cache holds. reconstruction: KVzip's prompt, for a policy that
  scores from that pass (its time is part of the TTFT)."""
  def prefill():
    return models.prefill(config, params, tokens, lengths, policy, reserve=decode_steps,
                          reconstruction=reconstruction)

  def step(logits, cache):
    return models.decode_step(config, params, cache, jnp.argmax(logits, -1).astype(jnp.int32), policy)

  t = time.perf_counter()
  jax.block_until_ready(prefill())
  first = time.perf_counter() - t
  ttft = _median_ms(prefill, reps)
  logits, cache = prefill()
  held = akv.nbytes(cache)
  logits, cache = step(logits, cache)     # warm-up (compiles)
  jax.block_until_ready(logits)
  t = time.perf_counter()
  for _ in range(decode_steps - 1):
    logits, cache = step(logits, cache)
  jax.block_until_ready(logits)
  tpot = 1e3 * (time.perf_counter() - t) / max(decode_steps - 1, 1)
  return dict(ttft_ms=ttft, first_call_s=first, tpot_ms=tpot, cache_bytes=int(held))


def speed(config, params, policy: akv.Policy, batches, length: int, decode_steps: int, reps: int, seed: int, *,
          progress: bool = True, text: TextTasks | None = None) -> list[dict]:
  """TTFT, TPOT and tokens/s at each batch size, on task prompts of `length` task tokens."""
  vocab = tasks.Vocab()
  rows = []
  for b in tqdm(batches, desc=f"{policy.name}: speed", disable=not progress):
    batch = tasks.make_batch(list(tasks.TASK_NAMES), np.random.default_rng(seed), length, vocab, b)
    toks, lens = (jnp.asarray(batch.prompts), jnp.asarray(batch.lengths)) if text is None else text.encode(batch)
    t = time_prefill_decode(config, params, toks, lens, policy, decode_steps=decode_steps, reps=reps)
    rows.append(dict(batch=b, length=length, ttft_ms=round(t["ttft_ms"], 3), tpot_ms=round(t["tpot_ms"], 3),
                     tokens_per_s=round(b / t["tpot_ms"] * 1e3, 2), cache_bytes=t["cache_bytes"]))
  return rows


def peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")
