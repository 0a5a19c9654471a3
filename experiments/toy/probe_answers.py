"""Where in its answers does a model go wrong? Teacher-forced accuracy at each answer position, per task.

    python experiments/toy/probe_answers.py [--model_path DIR] [--lengths 256 2048] [--rows 64] \
        --out experiments/results/answer_positions_default.json

Greedy scores say how much of an answer is right; this says which token is wrong. Each prompt is followed by its
true answer (teacher forcing, one full forward, f32), and at answer position k (0 = the first token after the
prompt; SEP and EOS count as positions) it reports:
  accuracy      the argmax is the true token;
  prob          the probability given to the true token;
  repeat_prob   the probability given to ids the answer already gave before position k (other than specials
                such as SEP), the mass a model that cannot tell what it has said puts on saying it again;
  rows          how many answers reach position k (multi-value and multi-query answers vary in length).
For the word-frequency tasks position k is the (k+1)-th most frequent word, so the columns read as accuracy by rank.
train_tiny.py writes the same table for the eval lengths into scores.json.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import numpy as np

from akv_jax import models, tasks
from experiments.result_files import command_line, machine, report


def answer_positions(config, params, *, length: int, task_names=tuple(tasks.TASK_NAMES), rows: int = 64,
                     batch: int = 16, seed: int = 0) -> dict:
  """Per task, per answer position: accuracy, prob, repeat_prob and rows (see the module docstring).

  Prompts are drawn from `seed` (`rows` per task, `batch` rows per forward). Returns
  {task: {"accuracy": [..], "prob": [..], "repeat_prob": [..], "rows": [..]}}, one entry per answer position.
  """
  if rows < 1 or batch < 1:
    raise ValueError(f"rows={rows} and batch={batch} must be >= 1")
  vocab = tasks.Vocab()
  width = length + max(tasks.get_task(t).max_answer_length() for t in task_names)
  if width > config.max_seq_len:
    raise ValueError(f"length={length} plus the longest answer is {width} tokens, over the model's "
                     f"max_seq_len={config.max_seq_len}")
  rng = np.random.default_rng(seed)
  forward = jax.jit(lambda p, t: jax.nn.log_softmax(models.forward(config, p, t).astype(jnp.float32), axis=-1))
  out = {}
  for name in task_names:
    hit, prob, rep = [], [], []   # per row: one list per answer position
    for start in range(0, rows, batch):
      n = min(batch, rows - start)
      samples = tasks.make_batch([name] * n, rng, length, vocab, n).samples
      toks, _ = tasks.training_batch(samples, length=width)
      # Pad rows keep one compiled shape per length; their outputs are dropped.
      toks = np.concatenate([toks, np.zeros((batch - n, width), toks.dtype)])
      logp = np.asarray(forward(params, jnp.asarray(toks)))                               # [batch, width, V]
      for i, s in enumerate(samples):
        pos = length - 1 + np.arange(len(s.answer))     # logits at pos predict answer token pos - length + 1
        lp = logp[i, pos]                                                                 # [A, V]
        hit.append(lp.argmax(-1) == s.answer)
        prob.append(np.exp(lp[np.arange(len(s.answer)), s.answer]))
        said = [sorted({int(t) for t in s.answer[:k] if t >= tasks.vocab.NUM_SPECIALS and t != s.answer[k]})
                for k in range(len(s.answer))]
        rep.append(np.asarray([np.exp(lp[k, ids]).sum() for k, ids in enumerate(said)]))
    longest = max(len(h) for h in hit)
    table = {"accuracy": [], "prob": [], "repeat_prob": [], "rows": []}
    for k in range(longest):
      have = [r for r in range(len(hit)) if len(hit[r]) > k]
      table["accuracy"].append(round(float(np.mean([hit[r][k] for r in have])), 4))
      table["prob"].append(round(float(np.mean([prob[r][k] for r in have])), 4))
      table["repeat_prob"].append(round(float(np.mean([rep[r][k] for r in have])), 4))
      table["rows"].append(len(have))
    out[name] = table
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model_path", default=None, help="a directory written by train_tiny.py (default: shipped)")
  parser.add_argument("--lengths", type=int, nargs="+", default=[256, 2048])
  parser.add_argument("--tasks", nargs="+", default=list(tasks.TASK_NAMES))
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="write the result JSON here")
  args = parser.parse_args(argv)
  for name in args.tasks:
    tasks.get_task(name)   # unknown names fail here, before the model loads
  config, params = models.load_default(args.model_path)
  result = {"command": command_line("toy/probe_answers.py", argv),
            "model": args.model_path or "default", "rows": args.rows, "machine": machine(),
            "by_length": {str(n): answer_positions(config, params, length=n, task_names=tuple(args.tasks),
                                                   rows=args.rows, batch=args.batch, seed=args.seed)
                          for n in args.lengths}}
  return report(result, args.out)


if __name__ == "__main__":
  main()
