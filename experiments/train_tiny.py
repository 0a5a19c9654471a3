"""Trains the shipped tiny decoder on the RULER-style tasks (akv_jax.tasks) with optax, on CPU or a GPU.

    python experiments/train_tiny.py --config experiments/train_tiny.yaml [--set key=value ...] [--tiny]

Teacher-forced next-token loss on the answer tokens only (the prompt's filler is random and unpredictable).
Lengths follow a curriculum: short prompts first so retrieval is learned cheaply, then a growing share of
prompts at the full context length, where the model is evaluated. Training stops at `steps` or at
`time_budget_min`, whichever comes first; then it evaluates greedy generation with the full cache and writes:

  OUT/params/            orbax checkpoint of the parameters
  OUT/config.json        the model config (LlamaConfig fields)
  OUT/train_log.jsonl    one line per logged step (loss, lengths, seconds)
  OUT/scores.json        per-task accuracy at the eval lengths, the machine, the wall time
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import yaml
from tqdm import tqdm

import akv_jax as akv
from akv_jax import models, tasks
from experiments.run_experiment import apply_set


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  out: str = "akv_jax/models/default"
  seed: int = 0
  # Model.
  hidden_size: int = 128
  intermediate_size: int = 384
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  rope_theta: float = 10000.0
  context: int = 2048
  # Data.
  task_names: tuple[str, ...] = tuple(tasks.TASK_NAMES)
  lengths: tuple[int, ...] = (128, 256, 512, 1024, 2048)
  curriculum_steps: int = 1200    # steps over which the length mix moves from all-shortest to final_mix
  final_mix: tuple[float, ...] = (0.25, 0.25, 0.2, 0.15, 0.15)   # share of each length after the curriculum
  batch: int = 8                   # eval batch, and the train batch at lengths where tokens_per_step allows less
  tokens_per_step: int = 8192      # train batch at length T is clip(tokens_per_step // T, batch // 2, max_batch)
  max_batch: int = 32
  # Optimization.
  steps: int = 2600
  lr: float = 2e-3
  warmup: int = 200
  weight_decay: float = 0.01
  clip: float = 1.0
  recall_share: float = 0.5       # share of steps on dense recall streams (see recall_stream)
  recall_pairs: int = 16
  time_budget_min: float = 48.0
  log_every: int = 25
  eval_every: int = 800
  eval_samples: int = 16           # per task and eval length
  eval_lengths: tuple[int, ...] = (2048,)

  def model_config(self) -> models.LlamaConfig:
    vocab = tasks.Vocab()
    return models.LlamaConfig(vocab_size=vocab.size, hidden_size=self.hidden_size,
                              intermediate_size=self.intermediate_size, num_layers=self.num_layers,
                              num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, rope_theta=self.rope_theta,
                              max_seq_len=self.context + 64)


TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, context=128,
            lengths=(64, 128), final_mix=(0.5, 0.5), curriculum_steps=2, batch=4, max_batch=4, steps=3, log_every=1, eval_every=3,
            eval_samples=1, eval_lengths=(128,), warmup=1, recall_pairs=4)


def length_mix(cfg: TrainConfig, step: int) -> np.ndarray:
  """Sampling probabilities over cfg.lengths: all shortest at step 0, moving linearly to cfg.final_mix.

  Long prompts cost quadratically more per step, so the final mix keeps most steps short: retrieval and
  counting are learned on short prompts, the long share teaches the model to do them over the full context.
  """
  frac = min(1.0, step / max(cfg.curriculum_steps, 1))
  start = np.zeros(len(cfg.lengths))
  start[0] = 1.0
  p = (1 - frac) * start + frac * np.asarray(cfg.final_mix, np.float64)
  return p / p.sum()


def recall_stream(rng: np.random.Generator, length: int, vocab, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
  """A dense associative-recall sequence in the tasks' own format, for teaching retrieval quickly.

  Records "KEY k VALUE v.." and later queries "QUERY k ANSWER v.. EOS" for keys already seen, among filler
  words. Every query's answer is supervised, so one sequence carries many retrieval examples where a task
  prompt carries one; the model learns the lookup circuit (an induction-style head) from these, then the
  tasks' single queries reuse it.

  Returns tokens i32[length] and the loss mask bool[length] (True on answer tokens, as training_sequence).
  """
  keys = rng.choice(np.asarray(vocab.key_ids), n_pairs, replace=False)
  vals = [rng.choice(np.asarray(vocab.value_ids), int(rng.integers(1, 4)), replace=False) for _ in range(n_pairs)]
  words = np.asarray(vocab.word_ids)
  toks, mask, seen = [tasks.vocab.BOS], [False], 0
  while len(toks) < length:
    r = rng.random()
    if r < 0.12 and seen < n_pairs:
      rec = [tasks.vocab.KEY, int(keys[seen]), tasks.vocab.VALUE, *map(int, vals[seen])]
      toks += rec
      mask += [False] * len(rec)
      seen += 1
    elif r < 0.3 and seen:
      i = int(rng.integers(seen))
      ans = [*map(int, vals[i]), tasks.vocab.EOS]
      toks += [tasks.vocab.QUERY, int(keys[i]), tasks.vocab.ANSWER, *ans]
      mask += [False] * 3 + [True] * len(ans)
    else:
      toks.append(int(rng.choice(words)))
      mask.append(False)
  return np.asarray(toks[:length], np.int32), np.asarray(mask[:length], bool)


def train_batch(cfg: TrainConfig, length: int) -> int:
  """Short prompts carry as much answer signal as long ones at a fraction of the cost: batch more of them."""
  return int(np.clip(cfg.tokens_per_step // length, max(1, cfg.batch // 2), cfg.max_batch))


def loss_fn(params, config, tokens, mask):
  logits = models.llama._forward(config, params, tokens[:, :-1])
  targets = tokens[:, 1:]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  m = mask[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * m) / jnp.maximum(jnp.sum(m), 1.0)


def make_step(config, optimizer):
  @jax.jit
  def step(params, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(loss_fn)(params, config, tokens, mask)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def evaluate(config, params, cfg: TrainConfig, rng: np.random.Generator, vocab) -> dict:
  """Greedy generation with the full cache; accuracy per task at each eval length."""
  out = {}
  max_new = max(tasks.get_task(t).max_answer_length() for t in cfg.task_names)
  for length in cfg.eval_lengths:
    preds, samples = [], []
    names = [t for t in cfg.task_names for _ in range(cfg.eval_samples)]
    for i in range(0, len(names), cfg.batch):
      chunk = names[i:i + cfg.batch]
      batch = tasks.make_batch(chunk, rng, length, vocab, len(chunk))
      gen, _, _ = models.generate(config, params, jnp.asarray(batch.prompts), jnp.asarray(batch.lengths),
                                  akv.presets.get("full"), max_new, stop_tokens=(tasks.vocab.EOS,))
      preds.extend(np.asarray(gen))
      samples.extend(batch.samples)
    out[str(length)] = tasks.score_batch(np.stack(preds), samples)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None)
  parser.add_argument("--set", action="append", default=[], help="field=value (YAML-typed)")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  raw = yaml.safe_load(pathlib.Path(args.config).read_text()) if args.config else {}
  raw = raw or {}
  if args.tiny:
    raw.update(TINY)
  for item in args.set:
    try:
      apply_set(raw, item)
    except ValueError as e:
      raise SystemExit(f"error: {e}") from e
  if args.out:
    raw["out"] = args.out
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(raw) - fields)
  if unknown:
    raise SystemExit(f"error: unknown config field(s) {unknown}; known: {sorted(fields)}")
  raw = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
  cfg = TrainConfig(**raw)
  if len(cfg.final_mix) != len(cfg.lengths):
    raise SystemExit(f"error: final_mix {cfg.final_mix} needs one share per length in {cfg.lengths}")
  if max(cfg.lengths) > cfg.context or max(cfg.eval_lengths) > cfg.context:
    raise SystemExit(f"error: lengths {cfg.lengths} / eval_lengths {cfg.eval_lengths} exceed context={cfg.context}")

  vocab = tasks.Vocab()
  config = cfg.model_config()
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  params = models.init_params(config, jax.random.key(cfg.seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1),
                                                cfg.lr * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(cfg.clip),
                          optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay))
  opt_state = optimizer.init(params)
  step_fn = make_step(config, optimizer)
  rng = np.random.default_rng(cfg.seed)
  eval_rng = np.random.default_rng(cfg.seed + 10_000)
  max_answer = max(tasks.get_task(t).max_answer_length() for t in cfg.task_names)
  log = open(out / "train_log.jsonl", "w")
  start = time.time()
  evals = {}
  step = 0
  bar = tqdm(range(cfg.steps), desc="train", mininterval=10)
  for step in bar:
    length = int(rng.choice(cfg.lengths, p=length_mix(cfg, step)))
    bsz = train_batch(cfg, length)
    if rng.random() < cfg.recall_share:
      rows = [recall_stream(rng, length + max_answer, vocab, cfg.recall_pairs) for _ in range(bsz)]
      toks, mask = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    else:
      names = list(rng.choice(cfg.task_names, size=bsz))
      batch = tasks.make_batch(names, rng, length, vocab, bsz)
      # One padded width per length bucket keeps the number of compiled train steps at len(lengths).
      toks, mask = tasks.training_batch(batch.samples, length=length + max_answer)
    params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(toks), jnp.asarray(mask))
    if step % cfg.log_every == 0:
      rec = {"step": step, "loss": float(loss), "length": length, "seconds": round(time.time() - start, 1)}
      log.write(json.dumps(rec) + "\n")
      log.flush()
      bar.set_postfix(loss=f"{float(loss):.3f}", length=length)
    if cfg.eval_every and step and step % cfg.eval_every == 0:
      evals[str(step)] = evaluate(config, params, dataclasses.replace(cfg, eval_samples=max(1, cfg.eval_samples // 4)),
                                  eval_rng, vocab)
      log.write(json.dumps({"step": step, "eval": evals[str(step)]}) + "\n")
      log.flush()
    if time.time() - start > cfg.time_budget_min * 60:
      break
  train_seconds = time.time() - start
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save((out / "params").resolve(), params, force=True)
  (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1, default=str) + "\n")
  final = evaluate(config, params, cfg, np.random.default_rng(cfg.seed + 20_000), vocab)
  result = {"command": "python experiments/train_tiny.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "train_config": dataclasses.asdict(cfg), "steps_run": step + 1, "train_seconds": round(train_seconds, 1),
            "device": jax.devices()[0].device_kind, "platform": platform.machine(), "final_eval": final,
            "evals_during_training": evals}
  (out / "scores.json").write_text(json.dumps(result, indent=1) + "\n")
  print(json.dumps(final, indent=1))
  return result


if __name__ == "__main__":
  main()
