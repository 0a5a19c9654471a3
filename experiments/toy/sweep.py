"""The toy model's runner: a list of policies against the baseline on identical prompts of the RULER-style tasks.

    python experiments/toy/sweep.py [--config experiments/toy/sweep.yaml] [--out DIR] [--set key=value ...]
        [--tiny] [--model_path DIR]

The baseline (default: the full cache) is evaluated once, then every listed policy on the same prompts; one
policy is `--set "policies=[hybrid_8x]"`, the README's table of every policy is the config as shipped. Each is
measured as experiments/model_eval.py says: accuracy per task and prompt length, KV bytes held and the compression
ratio (from the arrays), peak device memory where the backend reports it, and TTFT / TPOT / tokens per second at
several batch sizes after warm-up. Writes DIR/results.json (schema in docs/experiments.md), DIR/report.md (a table
per length) and the plots accuracy_vs_ratio.png (with the baseline's line), memory_vs_ratio.png and
speed_vs_batch.png. The real model has its own runner, experiments/run_real.py; this one is for the tiny trained
model the fast tests use (experiments/toy/README.md).

Config fields (anything else is an error naming it):
  policies        presets to evaluate (akv_jax.presets.names()); baseline: the preset they are compared with
                  (default full), evaluated once whether listed or not
  fit_named       presets named for a ratio (hybrid_8x) meet it on the model at each length (their byte
                  target); false: their fixed keep (akv.presets.fixed), as --tiny runs them: no ratio is reachable
                  at a smoke run's length
  model           "default" (the shipped model, akv_jax/models/default) or a directory written by train_tiny.py;
                  --model_path instead runs a Hugging Face Llama checkpoint with its tokenizer, the tasks rendered
                  as text (experiments/model_eval.py: TextTasks)
  dtype           model and cache dtype for the run (default bfloat16, as served)
  tasks           task names (default: all of akv_jax.tasks.TASK_NAMES)
  lengths         prompt lengths in tokens (default [2048], the shipped model's context); the plots and each
                  policy's `retained` are at the last one
  samples, batch  prompts per task and length, and rows per generate call
  speed_batches   batch sizes for TTFT / TPOT; speed_length: their prompt length; decode_steps; reps
  seed            prompt seed; out: output directory
Overrides apply in order (experiments/config_files.py): the YAML, then --tiny (a smoke run at length 256, written to
<out>-tiny unless --out is given), then each --set key=value; --out last.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import akv_jax as akv  # noqa: E402
from akv_jax import models, tasks  # noqa: E402
from experiments import config_files, model_eval, result_files  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().with_name("sweep.yaml")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig:
  policies: tuple[str, ...]
  baseline: str = "full"
  fit_named: bool = True
  model: str = "default"
  dtype: str = "bfloat16"
  tasks: tuple[str, ...] = tuple(tasks.TASK_NAMES)
  lengths: tuple[int, ...] = (2048,)
  samples: int = 16
  batch: int = 8
  speed_batches: tuple[int, ...] = (1, 4, 8)
  speed_length: int = 2048
  decode_steps: int = 16
  reps: int = 3
  seed: int = 0
  out: str = ""

  def __post_init__(self):
    if isinstance(self.policies, str) or not self.policies:
      raise ValueError(f"config field policies={self.policies!r} must be a non-empty list of presets")
    for name in self.policies:
      try:
        akv.presets.get(name)
      except ValueError as e:
        raise ValueError(f"config field policies: {e}") from None
    twice = sorted({n for n in self.policies if self.policies.count(n) > 1})
    if twice:
      raise ValueError(f"config field policies names {twice} more than once")
    try:
      akv.presets.get(self.baseline)
    except ValueError as e:
      raise ValueError(f"config field baseline: {e}") from None
    for name in self.tasks:
      tasks.get_task(name)
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"config field dtype={self.dtype!r} must be 'float32' or 'bfloat16'")
    for field in ("samples", "batch", "decode_steps", "reps", "speed_length"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
        raise ValueError(f"config field {field}={getattr(self, field)!r} must be an int >= 1")
    for field in ("lengths", "speed_batches"):
      values = getattr(self, field)
      if not values or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"config field {field}={list(values)!r} must be a non-empty list of ints >= 1")

  def names(self) -> list[str]:
    """What the run evaluates, in order: the baseline first (once), then the listed policies."""
    return [self.baseline] + [n for n in self.policies if n != self.baseline]


TINY = dict(fit_named=False, lengths=[256], samples=2, batch=7, speed_batches=[1, 2], speed_length=256, decode_steps=3, reps=1)


def load_config(path: str | pathlib.Path = CONFIG, *, sets: tuple[str, ...] = (), tiny: bool = False) -> SweepConfig:
  return config_files.load(str(path), SweepConfig, required="policies",
                           required_hint=f"listing presets ({', '.join(akv.presets.names())})", sets=sets,
                           tiny=TINY if tiny else None, default_out="out/toy_sweep")


def load_model(cfg: SweepConfig, model_path: str | None):
  """(config, params, text) of the shipped / trained model (text None), or of a Hugging Face checkpoint whose
  tokenizer reads the tasks as text (model_eval.TextTasks)."""
  if model_path is not None:
    config, params = models.load_checkpoint(model_path, dtype=cfg.dtype)
    tokenizer = models.load_tokenizer(model_path)
    stops = tuple(i for i in (tokenizer.token_to_id(t) for t in ("</s>", "<|eot_id|>", "<|end_of_text|>", "<eos>"))
                  if i is not None)
    return config, params, model_eval.TextTasks(tokenizer, stops)
  config, params = models.load_default(None if cfg.model == "default" else cfg.model)
  need = max(max(cfg.lengths), cfg.speed_length) + max(cfg.decode_steps,
                                                      max(tasks.get_task(t).max_answer_length() for t in cfg.tasks))
  if need > config.max_seq_len:
    raise ValueError(f"lengths {list(cfg.lengths)} / speed_length {cfg.speed_length} plus decoding need {need} "
                     f"positions; the model has max_seq_len={config.max_seq_len}")
  return (*model_eval.cast_model(config, params, cfg.dtype), None)


def evaluate(cfg: SweepConfig, config, params, prompts, name: str, *, progress: bool, text=None) -> dict:
  """One policy's entry: accuracy and bytes on the prompts, speed, peak device memory and the seconds it took."""
  policy = (akv.presets.get if cfg.fit_named else akv.presets.fixed)(name)
  start = time.perf_counter()
  entry = model_eval.accuracy(config, params, policy, prompts, progress=progress, text=text)
  entry["speed"] = model_eval.speed(config, params, policy, cfg.speed_batches, cfg.speed_length,
                                    cfg.decode_steps, cfg.reps, cfg.seed + 1, progress=progress, text=text)
  entry["peak_device_bytes"] = model_eval.peak_memory()
  entry["seconds"] = round(time.perf_counter() - start, 1)
  return entry


def table(results: dict, length: str) -> str:
  """One row per policy at `length`: ratio, average, retained (against the baseline there), per task, speed."""
  rows = results["policies"]
  base = rows[results["baseline"]]["accuracy"][length]["average"]
  names = [n for n in next(iter(rows.values()))["accuracy"][length] if n != "average"]
  b = results["config"]["speed_batches"][-1]
  lines = ["| policy | ratio | average | retained | " + " | ".join(names) + f" | TPOT ms (B={b}) | tokens/s (B={b}) |",
           "|---|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|"]
  for name, e in rows.items():
    acc = e["accuracy"][length]
    sp = e["speed"][-1]
    retained = acc["average"] / base if base > 0 else float("nan")
    lines.append(f"| `{name}` | {e['compression_ratio']:.2f}x | {acc['average']:.3f} | {retained:.3f} | "
                 + " | ".join(f"{acc[n]:.2f}" for n in names) + f" | {sp['tpot_ms']:.1f} | {sp['tokens_per_s']:.0f} |")
  return "\n".join(lines)


def report(results: dict) -> str:
  cfg, m = results["config"], results["machine"]
  lines = [f"# {', '.join(cfg['policies'])} vs {results['baseline']}, {cfg['samples']} prompts per task", "",
           f"Command: `{results['command']}`; machine: {m['device_kind']}, {m['cpu_count']} cores, jax {m['jax']}",
           ""]
  for length in results["policies"][results["baseline"]]["accuracy"]:
    lines += [f"## {length} tokens", "", table(results, length), ""]
  return "\n".join(lines)


def plots(results: dict, out: pathlib.Path) -> None:
  length, rows = results["length"], results["policies"]
  base = rows[results["baseline"]]["accuracy"][length]["average"]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, e in rows.items():
    ax.scatter(e["compression_ratio"], e["accuracy"][length]["average"])
    ax.annotate(name, (e["compression_ratio"], e["accuracy"][length]["average"]), fontsize=7)
  ax.axhline(base, color="gray", ls="--", label=f"{results['baseline']} (baseline)")
  ax.legend()
  ax.set_xlabel("compression ratio (dense bytes / bytes held)")
  ax.set_ylabel(f"average accuracy at {length} tokens")
  fig.tight_layout()
  fig.savefig(out / "accuracy_vs_ratio.png", dpi=120)
  plt.close(fig)
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, e in rows.items():
    ax.scatter(e["compression_ratio"], e["bytes_held"] / 2**20)
    ax.annotate(name, (e["compression_ratio"], e["bytes_held"] / 2**20), fontsize=7)
  ax.set_xlabel("compression ratio")
  ax.set_ylabel("KV MiB held (all prompts)")
  fig.tight_layout()
  fig.savefig(out / "memory_vs_ratio.png", dpi=120)
  plt.close(fig)
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
  for ax, key, label in zip(axes, ("ttft_ms", "tpot_ms", "tokens_per_s"), ("TTFT (ms)", "TPOT (ms)", "tokens/s")):
    for name, e in rows.items():
      ax.plot([r["batch"] for r in e["speed"]], [r[key] for r in e["speed"]], "o-", label=name, lw=1)
    ax.set_xlabel("batch")
    ax.set_ylabel(label)
  axes[-1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(out / "speed_vs_batch.png", dpi=120)
  plt.close(fig)


def run(cfg: SweepConfig, *, command: str = "", model_path: str | None = None, progress: bool = True) -> dict:
  """Evaluates cfg.names() on one draw of prompts and writes results.json, report.md and the plots in cfg.out."""
  config, params, text = load_model(cfg, model_path)
  prompts = model_eval.draw_prompts(cfg.tasks, cfg.lengths, cfg.samples, cfg.batch, cfg.seed)
  length = str(cfg.lengths[-1])
  rows = {}
  for name in cfg.names():
    rows[name] = evaluate(cfg, config, params, prompts, name, progress=progress, text=text)
    print(f"{name}: ratio {rows[name]['compression_ratio']}x, average "
          f"{rows[name]['accuracy'][length]['average']:.3f} ({rows[name]['seconds']} s)", flush=True)
  base = rows[cfg.baseline]["accuracy"][length]["average"]
  for e in rows.values():
    e["retained"] = e["accuracy"][length]["average"] / base if base > 0 else float("nan")
  results = dict(command=command, config=dataclasses.asdict(cfg), machine=result_files.machine(),
                 model=dict(source=model_path or cfg.model, dtype=cfg.dtype,
                            params=int(sum(x.size for x in jax.tree_util.tree_leaves(params))),
                            layers=config.num_layers, kv_heads=config.num_kv_heads, head_dim=config.hd),
                 length=length, baseline=cfg.baseline, policies=rows)
  out = pathlib.Path(cfg.out)
  result_files.write_json(out / "results.json", results)
  (out / "report.md").write_text(report(results))
  plots(results, out)
  return results


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=str(CONFIG), help="YAML config (default: experiments/toy/sweep.yaml)")
  parser.add_argument("--out", default=None, help="output directory (overrides the config's out)")
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable), e.g. --set \"policies=[hybrid_8x]\"")
  parser.add_argument("--tiny", action="store_true", help="smoke run at length 256")
  parser.add_argument("--model_path", default=None, help="a Hugging Face Llama checkpoint directory")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  sets = tuple(args.sets) + ((f"out={args.out}",) if args.out else ())
  try:
    cfg = load_config(args.config, sets=sets, tiny=args.tiny)
    results = run(cfg, command=result_files.command_line("toy/sweep.py", argv), model_path=args.model_path,
                  progress=not args.no_progress)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  print(report(results))
  print(f"wrote {cfg.out}/results.json, report.md, accuracy_vs_ratio.png, memory_vs_ratio.png, speed_vs_batch.png")
  return results


if __name__ == "__main__":
  main()
