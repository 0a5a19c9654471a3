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


def accuracy(config, params, policy: akv.Policy, prompts: list[Prompts], *, progress: bool = True) -> dict:
  """Per length: per-task accuracy and average; plus bytes held / dense bytes summed over the prompt batches."""
  max_new = max(tasks.get_task(p.task).max_answer_length() for p in prompts)
  preds: dict[int, list] = {}
  held = dense = 0
  for p in tqdm(prompts, desc=f"{policy.name}: tasks", disable=not progress, mininterval=5):
    toks, lens = jnp.asarray(p.batch.prompts), jnp.asarray(p.batch.lengths)
    gen, _, _ = models.generate(config, params, toks, lens, policy, max_new, stop_tokens=(tasks.vocab.EOS,))
    # Storage is static-shaped, so the shapes of a prefill's cache give exactly the bytes a real one holds.
    held += akv.nbytes(jax.eval_shape(lambda t, n: models.prefill(config, params, t, n, policy)[1], toks, lens))
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


def speed(config, params, policy: akv.Policy, batches, length: int, decode_steps: int, reps: int, seed: int, *,
          progress: bool = True) -> list[dict]:
  """TTFT, TPOT and tokens/s at each batch size, on task prompts of `length` tokens."""
  vocab = tasks.Vocab()
  rows = []
  for b in tqdm(batches, desc=f"{policy.name}: speed", disable=not progress):
    batch = tasks.make_batch(list(tasks.TASK_NAMES), np.random.default_rng(seed), length, vocab, b)
    toks, lens = jnp.asarray(batch.prompts), jnp.asarray(batch.lengths)
    prefill = lambda: models.prefill(config, params, toks, lens, policy, reserve=decode_steps)  # noqa: E731
    jax.block_until_ready(prefill())
    ttft = _median_ms(prefill, reps)
    logits, cache = prefill()
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    logits, cache = models.decode_step(config, params, cache, tok, policy)     # warm-up (compiles)
    jax.block_until_ready(logits)
    t = time.perf_counter()
    for _ in range(decode_steps - 1):
      logits, cache = models.decode_step(config, params, cache, jnp.argmax(logits, -1).astype(jnp.int32), policy)
    jax.block_until_ready(logits)
    tpot = 1e3 * (time.perf_counter() - t) / max(decode_steps - 1, 1)
    rows.append(dict(batch=b, length=length, ttft_ms=round(ttft, 3), tpot_ms=round(tpot, 3),
                     tokens_per_s=round(b / tpot * 1e3, 2), cache_bytes=int(akv.nbytes(cache))))
    del cache
  return rows


def peak_memory() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")
