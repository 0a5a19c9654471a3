"""Trains the shipped tiny decoder on the RULER-style tasks (akv_jax.tasks) with optax, on CPU or a GPU.

    python experiments/toy/train_tiny.py --config experiments/toy/train_tiny.yaml [--set key=value ...] [--tiny]
        [--out DIR]

The config is read as every runner's is (experiments/config_files.py): the YAML, then --tiny (a seconds-long smoke
run, written to <out>-tiny unless --out is given, so it never overwrites the shipped model), then each --set.

Loss: teacher-forced next-token loss on the answer tokens, plus (body_weight) the next-word loss over the body of
the two word-frequency tasks, whose filler is their evidence; the other tasks' filler is random and unpredictable.
Half the steps (recall_share) are dense associative-recall streams in the tasks' format, which teach the lookup
circuit with one supervised answer every few tokens instead of one per prompt.

Progress is max(step / steps, elapsed / time_budget): the learning-rate schedule (linear warmup over `warmup`
steps, then cosine to min_lr_frac * lr) and the length curriculum (all prompts at the shortest length at first,
moving to final_mix over the first curriculum_frac of progress) follow it, so a run cut short by its time budget
still anneals and still reaches the full context. Batches are drawn in `workers` processes from per-step seeds.

Writes, in --out:
  params/            orbax checkpoint of the parameters (also rewritten at each evaluation during training)
  config.json        the model config (LlamaConfig fields)
  train_log.jsonl    one line per logged step (loss, answer loss, lr, length, batch, seconds) or evaluation
  scores.json        per-task accuracy with the full cache at the eval lengths, the key-lookup probe
                     (experiments/toy/probe_lookup.py), teacher-forced accuracy at each answer position
                     (experiments/toy/probe_answers.py), the machine (experiments/result_files.py), the wall time
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import pathlib
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

import akv_jax as akv
from akv_jax import models, tasks
from experiments import config_files
from experiments.result_files import command_line, machine, write_json
from experiments.toy.probe_answers import answer_positions
from experiments.toy.probe_lookup import lookup_accuracy

WORD_TASKS = ("common_words", "frequent_words")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  out: str = "akv_jax/models/default"
  seed: int = 0
  # Model.
  hidden_size: int = 256
  intermediate_size: int = 768
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  rope_theta: float = 10000.0
  context: int = 2048
  # Data.
  task_names: tuple[str, ...] = tuple(tasks.TASK_NAMES)
  task_weights: tuple[float, ...] = ()   # sampling weight per task in task_names; empty = uniform
  lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048)
  final_mix: tuple[float, ...] = (0.15, 0.2, 0.2, 0.2, 0.25)   # share of each length after the curriculum
  curriculum_frac: float = 0.3     # progress at which the length mix reaches final_mix
  tokens_per_step: int = 32768     # train batch at length T is clip(tokens_per_step // T, min_batch, max_batch)
  min_batch: int = 8
  max_batch: int = 128
  recall_share: float = 0.5        # share of steps on dense recall streams (see tasks.recall_stream)
  recall_pairs: int = 16
  body_weight: float = 0.2         # weight of the mean next-word loss over word-task bodies, against answers' 1
  workers: int = 0                 # processes drawing batches; 0 draws them in the training loop
  init_from: str = ""              # a model directory (config.json + params/) to continue training from
  # Optimization.
  steps: int = 20000
  time_budget_min: float = 6.0
  lr: float = 2e-3
  min_lr_frac: float = 0.05
  warmup: int = 150
  weight_decay: float = 0.01
  clip: float = 1.0
  # Logging and evaluation.
  log_every: int = 25
  eval_every_min: float = 1.5      # evaluate (eval_samples // 4 per task) and save params this often
  eval_samples: int = 16           # per task and eval length, at the end
  eval_batch: int = 8
  eval_lengths: tuple[int, ...] = (2048,)
  lookup_length: int = 256         # stream length of the lookup probe logged with each evaluation

  def model_config(self) -> models.LlamaConfig:
    vocab = tasks.Vocab()
    return models.LlamaConfig(vocab_size=vocab.size, hidden_size=self.hidden_size,
                              intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                              num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, rope_theta=self.rope_theta,
                              max_seq_len=self.context + 64)


TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, context=128,
            lengths=(64, 128), final_mix=(0.5, 0.5), curriculum_frac=0.5, min_batch=2, max_batch=4, steps=3,
            log_every=1, eval_every_min=0.0, eval_samples=1, eval_batch=4, eval_lengths=(128,), warmup=1,
            recall_pairs=4, workers=0, time_budget_min=5.0)


def progress(cfg: TrainConfig, step: int, elapsed: float) -> float:
  return min(1.0, max(step / max(cfg.steps, 1), elapsed / max(cfg.time_budget_min * 60, 1e-9)))


def learning_rate(cfg: TrainConfig, step: int, prog: float) -> float:
  """Linear warmup over cfg.warmup steps, then cosine from lr to min_lr_frac * lr as progress goes to 1."""
  if step < cfg.warmup:
    return cfg.lr * (step + 1) / cfg.warmup
  floor = cfg.lr * cfg.min_lr_frac
  return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * prog))


def length_mix(cfg: TrainConfig, prog: float) -> np.ndarray:
  """Sampling probabilities over cfg.lengths: all shortest at progress 0, final_mix from curriculum_frac on.

  Retrieval and counting are learned cheaply on short prompts; the long share teaches the model to do them
  over the full context, where it is evaluated.
  """
  frac = min(1.0, prog / max(cfg.curriculum_frac, 1e-9))
  start = np.zeros(len(cfg.lengths))
  start[0] = 1.0
  p = (1 - frac) * start + frac * np.asarray(cfg.final_mix, np.float64)
  return p / p.sum()


def train_batch(cfg: TrainConfig, length: int) -> int:
  """Short prompts carry as much answer signal as long ones at a fraction of the cost: batch more of them."""
  return int(np.clip(cfg.tokens_per_step // length, cfg.min_batch, cfg.max_batch))


def draw_batch(cfg: TrainConfig, step: int, length: int, recall: bool) -> tuple[np.ndarray, ...]:
  """The batch of one step, from its own seed (so workers can draw steps in any order).

  Returns tokens i32[B, L], answer mask bool[B, L] and loss weights f32[B, L] (1 on answers, body_weight spread
  over each word-task body), where L = length + the longest answer, one width per length bucket so the number of
  compiled train steps is len(lengths).
  """
  rng = np.random.default_rng([cfg.seed, step])
  vocab = tasks.Vocab()
  width = length + max(tasks.get_task(t).max_answer_length() for t in cfg.task_names)
  bsz = train_batch(cfg, length)
  if recall:
    rows = [tasks.recall_stream(rng, width, vocab, cfg.recall_pairs) for _ in range(bsz)]
    toks, mask = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    return toks, mask, mask.astype(np.float32)
  p = np.asarray(cfg.task_weights, np.float64) if cfg.task_weights else np.ones(len(cfg.task_names))
  names = list(rng.choice(cfg.task_names, size=bsz, p=p / p.sum()))
  batch = tasks.make_batch(names, rng, length, vocab, bsz)
  toks, mask = tasks.training_batch(batch.samples, length=width)
  weights = mask.astype(np.float32)
  for i, name in enumerate(names):
    if name in WORD_TASKS and cfg.body_weight > 0:
      # A word-task prompt is BOS marker body QUERY (tasks.base.assemble, no query tokens): the body fills
      # positions 2 .. length - 2, and each word after the first is weighted, the last one included.
      body = slice(3, length - 1)
      weights[i, body] = cfg.body_weight * mask[i].sum() / (body.stop - body.start)
  return toks, mask, weights


def loss_fn(params, config, tokens, mask, weights):
  logits = models.llama._forward(config, params, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  n = jnp.maximum(jnp.sum(mask[:, 1:]), 1)
  answer = jnp.sum(jnp.where(mask[:, 1:], nll, 0.0)) / n
  return jnp.sum(nll * weights[:, 1:]) / n, answer


def make_optimizer(cfg: TrainConfig):
  def chain(learning_rate):
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(learning_rate, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay))
  return optax.inject_hyperparams(chain)(learning_rate=cfg.lr)


def make_step(config, optimizer):
  @jax.jit
  def step(params, opt_state, tokens, mask, weights, lr):
    (loss, answer), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, config, tokens, mask, weights)
    opt_state.hyperparams["learning_rate"] = lr
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, answer
  return step


def evaluate(config, params, cfg: TrainConfig, rng: np.random.Generator, vocab, samples: int) -> dict:
  """Greedy generation with the full cache; accuracy per task at each eval length, `samples` rows per task.

  Rows go eval_batch at a time; the last chunk is topped up with extra rows (not scored) so every call has the
  same shape and generate compiles once per length.
  """
  out = {}
  max_new = max(tasks.get_task(t).max_answer_length() for t in cfg.task_names)
  full = akv.presets.get("full")
  for length in cfg.eval_lengths:
    names = [t for t in cfg.task_names for _ in range(samples)]
    preds, drawn = [], []
    for i in range(0, len(names), cfg.eval_batch):
      chunk = names[i:i + cfg.eval_batch]
      chunk = chunk + names[:cfg.eval_batch - len(chunk)]
      batch = tasks.make_batch(chunk, rng, length, vocab, len(chunk))
      gen, _, _ = models.generate(config, params, jnp.asarray(batch.prompts), jnp.asarray(batch.lengths), full,
                                  max_new, stop_tokens=(tasks.vocab.EOS,))
      keep = min(cfg.eval_batch, len(names) - i)
      preds.extend(np.asarray(gen)[:keep])
      drawn.extend(batch.samples[:keep])
    out[str(length)] = tasks.score_batch(np.stack(preds), drawn)
  return out


def probe(config, params, cfg: TrainConfig) -> dict:
  """The key-lookup probe (experiments/toy/probe_lookup.py): the circuit multi-key and multi-query needles need,
  seen as accuracy above the probe's key-blind baselines."""
  return lookup_accuracy(config, params, length=min(cfg.lookup_length, cfg.context), pairs=cfg.recall_pairs,
                         rows=32, seed=cfg.seed + 30_000)


def parse(argv) -> TrainConfig:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None)
  parser.add_argument("--set", action="append", default=[], help="field=value (YAML-typed)")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  try:
    cfg = config_files.load(args.config, TrainConfig, sets=tuple(args.set), tiny=TINY if args.tiny else None)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  if args.out:
    cfg = dataclasses.replace(cfg, out=args.out)
  if len(cfg.final_mix) != len(cfg.lengths):
    raise SystemExit(f"error: final_mix {cfg.final_mix} needs one share per length in {cfg.lengths}")
  if max(cfg.lengths) > cfg.context or max(cfg.eval_lengths) > cfg.context:
    raise SystemExit(f"error: lengths {cfg.lengths} / eval_lengths {cfg.eval_lengths} exceed context={cfg.context}")
  if cfg.task_weights and (len(cfg.task_weights) != len(cfg.task_names) or min(cfg.task_weights) < 0
                           or sum(cfg.task_weights) <= 0):
    raise SystemExit(f"error: task_weights {cfg.task_weights} needs one weight >= 0 per task in {cfg.task_names}")
  if cfg.workers < 0:
    raise SystemExit(f"error: workers={cfg.workers} must be >= 0")
  return cfg


class Batches:
  """Plans each step's (length, kind) in the training loop and draws its batch, in worker processes if any.

  The plan is made `depth` steps ahead, from the progress at planning time.
  """

  def __init__(self, cfg: TrainConfig):
    self.cfg = cfg
    self.rng = np.random.default_rng(cfg.seed)
    # spawn, not fork: a forked child of a process running JAX's threads can deadlock.
    self.pool = (concurrent.futures.ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"))
                 if cfg.workers else None)
    self.queue = collections.deque()
    self.planned = 0

  def _plan(self, prog: float):
    length = int(self.rng.choice(self.cfg.lengths, p=length_mix(self.cfg, prog)))
    recall = bool(self.rng.random() < self.cfg.recall_share)
    step, self.planned = self.planned, self.planned + 1
    if self.pool is None:
      return length, draw_batch(self.cfg, step, length, recall)
    return length, self.pool.submit(draw_batch, self.cfg, step, length, recall)

  def next(self, prog: float):
    depth = 1 if self.pool is None else 2 * self.cfg.workers
    while len(self.queue) < depth:
      self.queue.append(self._plan(prog))
    length, item = self.queue.popleft()
    return length, item if self.pool is None else item.result()

  def close(self):
    if self.pool is not None:
      self.pool.shutdown(cancel_futures=True)


def save_params(out: pathlib.Path, params) -> None:
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save((out / "params").resolve(), params, force=True)


def main(argv=None) -> dict:
  cfg = parse(argv)
  vocab = tasks.Vocab()
  config = cfg.model_config()
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "config.json", dataclasses.asdict(config), default=str)
  batches = Batches(cfg)   # before JAX starts its threads
  if cfg.init_from:
    loaded_config, params = models.load_default(cfg.init_from)
    if loaded_config != config:
      raise SystemExit(f"error: init_from={cfg.init_from} holds a different model: {loaded_config} vs {config}")
  else:
    params = models.init_params(config, jax.random.key(cfg.seed))
  optimizer = make_optimizer(cfg)
  opt_state = optimizer.init(params)
  step_fn = make_step(config, optimizer)
  eval_rng = np.random.default_rng(cfg.seed + 10_000)
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  log = open(out / "train_log.jsonl", "w")
  host = machine()
  log.write(json.dumps({"params": int(n_params), "machine": host}) + "\n")
  start = last_eval = time.time()
  evals = {}
  step = 0
  bar = tqdm(range(cfg.steps), desc="train", mininterval=10)
  try:
    for step in bar:
      prog = progress(cfg, step, time.time() - start)
      length, (toks, mask, weights) = batches.next(prog)
      lr = learning_rate(cfg, step, prog)
      params, opt_state, loss, answer = step_fn(params, opt_state, jnp.asarray(toks), jnp.asarray(mask),
                                                jnp.asarray(weights), jnp.float32(lr))
      if step % cfg.log_every == 0:
        rec = {"step": step, "loss": float(loss), "answer_loss": float(answer), "lr": lr, "length": length,
               "batch": int(toks.shape[0]), "seconds": round(time.time() - start, 1)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{float(answer):.3f}", length=length)
      if cfg.eval_every_min and time.time() - last_eval > cfg.eval_every_min * 60:
        evals[str(step)] = evaluate(config, params, cfg, eval_rng, vocab, max(1, cfg.eval_samples // 4))
        save_params(out, params)
        log.write(json.dumps({"step": step, "seconds": round(time.time() - start, 1), "eval": evals[str(step)],
                              "lookup": probe(config, params, cfg)}) + "\n")
        log.flush()
        last_eval = time.time()
      if progress(cfg, step + 1, time.time() - start) >= 1.0:
        break
  finally:
    batches.close()
  train_seconds = time.time() - start
  save_params(out, params)
  final = evaluate(config, params, cfg, np.random.default_rng(cfg.seed + 20_000), vocab, cfg.eval_samples)
  result = {"command": command_line("toy/train_tiny.py", argv),
            "train_config": dataclasses.asdict(cfg), "params": int(n_params), "steps_run": step + 1,
            "train_seconds": round(train_seconds, 1), "machine": host, "final_eval": final,
            "lookup": probe(config, params, cfg),
            "answer_positions": {str(n): answer_positions(config, params, length=n, task_names=cfg.task_names,
                                                          rows=2 * cfg.eval_samples, batch=cfg.eval_batch,
                                                          seed=cfg.seed + 40_000) for n in cfg.eval_lengths},
            "evals_during_training": evals}
  write_json(out / "scores.json", result)
  print(json.dumps(final, indent=1))
  return result


if __name__ == "__main__":
  main()
