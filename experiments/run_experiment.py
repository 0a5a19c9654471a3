"""The main job: a compression policy against the full cache on a model, on the RULER-style tasks.

    python experiments/run_experiment.py --config experiments/hybrid_8x.yaml [--out DIR] [--set key=value ...]
        [--tiny] [--model_path DIR]

One run evaluates the baseline (default: the full cache) and the policy on identical prompts and measures, for
each: accuracy per task and prompt length, KV bytes held and the compression ratio (from the arrays), peak device
memory where the backend reports it, and TTFT / TPOT / tokens per second at several batch sizes after warm-up
(experiments/model_eval.py says exactly how). It writes DIR/results.json (schema in docs/experiments.md),
DIR/report.md and DIR/accuracy.png, DIR/speed.png. experiments/sweep.py evaluates every policy in one run.

Config fields (anything else is an error naming it):
  policy          preset to evaluate (akv_jax.presets.names()); baseline: preset to compare with (default full)
  model           "default" (the shipped model, akv_jax/models/default) or a directory written by train_tiny.py;
                  --model_path instead runs a Hugging Face Llama checkpoint with its tokenizer, the tasks rendered
                  as text (experiments/model_eval.py: TextTasks)
  dtype           model and cache dtype for the run (default bfloat16, as served)
  tasks           task names (default: all of akv_jax.tasks.TASK_NAMES)
  lengths         prompt lengths in tokens (default [2048], the shipped model's context)
  samples, batch  prompts per task and length, and rows per generate call
  speed_batches   batch sizes for TTFT / TPOT; speed_length: their prompt length; decode_steps; reps
  seed            prompt seed; out: output directory
Overrides apply in order: the YAML, then --tiny (a smoke run at length 256), then each --set key=value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import akv_jax as akv  # noqa: E402
from akv_jax import models, tasks  # noqa: E402
from experiments import config_files, model_eval, result_files  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
  policy: str
  baseline: str = "full"
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
    for field in ("policy", "baseline"):
      try:
        akv.presets.get(getattr(self, field))
      except ValueError as e:
        raise ValueError(f"config field {field}: {e}") from None
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


TINY = dict(lengths=[256], samples=2, batch=7, speed_batches=[1, 2], speed_length=256, decode_steps=3, reps=1)


def load_config(path: str, *, sets: tuple[str, ...] = (), tiny: bool = False) -> RunConfig:
  return config_files.load(path, RunConfig, required="policy",
                           required_hint=f"naming a preset ({', '.join(akv.presets.names())})", sets=sets,
                           tiny=TINY if tiny else None, default_out="out/{cfg.policy}")


def load_model(cfg: RunConfig, model_path: str | None):
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


def evaluate(cfg: RunConfig, config, params, prompts, name: str, *, progress: bool, text=None) -> dict:
  policy = akv.presets.get(name)
  start = time.perf_counter()
  entry = model_eval.accuracy(config, params, policy, prompts, progress=progress, text=text)
  entry["speed"] = model_eval.speed(config, params, policy, cfg.speed_batches, cfg.speed_length,
                                    cfg.decode_steps, cfg.reps, cfg.seed + 1, progress=progress, text=text)
  entry["peak_device_bytes"] = model_eval.peak_memory()
  entry["seconds"] = round(time.perf_counter() - start, 1)
  return entry


def report(results: dict) -> str:
  cfg, base, pol = results["config"], results["baseline"], results["policy"]
  lines = [f"# {cfg['policy']} vs {cfg['baseline']}", "", f"Command: `{results['command']}`", "",
           f"Model: {results['model']}; machine: {results['machine']['device_kind']} "
           f"({results['machine']['backend']}), {results['machine']['cpu_count']} cores, jax "
           f"{results['machine']['jax']}", ""]
  for length in base["accuracy"]:
    names = list(base["accuracy"][length])
    lines += [f"## Accuracy at {length} tokens", "", "| | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    for label, entry in ((cfg["baseline"], base), (cfg["policy"], pol)):
      lines.append(f"| {label} | " + " | ".join(f"{entry['accuracy'][length][n]:.3f}" for n in names) + " |")
    lines.append("")
  lines += ["## Memory and speed", "",
            f"KV bytes held: {cfg['baseline']} {base['bytes_held']:,}, {cfg['policy']} {pol['bytes_held']:,} "
            f"(dense {pol['dense_bytes']:,}); ratio {pol['compression_ratio']}x "
            f"({cfg['baseline']}: {base['compression_ratio']}x). Retained accuracy: {results['retained']}.", "",
            "| policy | batch | TTFT ms | TPOT ms | tokens/s | cache bytes |", "|---|---:|---:|---:|---:|---:|"]
  for label, entry in ((cfg["baseline"], base), (cfg["policy"], pol)):
    for r in entry["speed"]:
      lines.append(f"| {label} | {r['batch']} | {r['ttft_ms']} | {r['tpot_ms']} | {r['tokens_per_s']} | "
                   f"{r['cache_bytes']:,} |")
  return "\n".join(lines) + "\n"


def plots(results: dict, out: pathlib.Path) -> None:
  cfg, base, pol = results["config"], results["baseline"], results["policy"]
  length = next(iter(base["accuracy"]))
  names = [n for n in base["accuracy"][length] if n != "average"] + ["average"]
  fig, ax = plt.subplots(figsize=(9, 3.5))
  x = range(len(names))
  ax.bar([i - 0.2 for i in x], [base["accuracy"][length][n] for n in names], 0.4, label=cfg["baseline"])
  ax.bar([i + 0.2 for i in x], [pol["accuracy"][length][n] for n in names], 0.4,
         label=f"{cfg['policy']} ({pol['compression_ratio']}x)")
  ax.set_xticks(list(x), names, rotation=30, ha="right")
  ax.set_ylabel(f"accuracy at {length} tokens")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / "accuracy.png", dpi=120)
  plt.close(fig)
  fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
  for ax, key, label in zip(axes, ("ttft_ms", "tpot_ms", "tokens_per_s"), ("TTFT (ms)", "TPOT (ms)", "tokens/s")):
    for name, entry in ((cfg["baseline"], base), (cfg["policy"], pol)):
      ax.plot([r["batch"] for r in entry["speed"]], [r[key] for r in entry["speed"]], "o-", label=name)
    ax.set_xlabel("batch")
    ax.set_ylabel(label)
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(out / "speed.png", dpi=120)
  plt.close(fig)


def run(cfg: RunConfig, *, command: str = "", model_path: str | None = None, progress: bool = True) -> dict:
  config, params, text = load_model(cfg, model_path)
  prompts = model_eval.draw_prompts(cfg.tasks, cfg.lengths, cfg.samples, cfg.batch, cfg.seed)
  base = evaluate(cfg, config, params, prompts, cfg.baseline, progress=progress, text=text)
  pol = base if cfg.policy == cfg.baseline else evaluate(cfg, config, params, prompts, cfg.policy,
                                                         progress=progress, text=text)
  retained = {length: round(pol["accuracy"][length]["average"] / base["accuracy"][length]["average"], 4)
              if base["accuracy"][length]["average"] > 0 else None for length in base["accuracy"]}
  results = dict(command=command, config=dataclasses.asdict(cfg), machine=result_files.machine(),
                 model=dict(source=model_path or cfg.model, dtype=cfg.dtype, params=int(sum(x.size for x in
                                                                             jax.tree_util.tree_leaves(params))),
                            layers=config.num_layers, kv_heads=config.num_kv_heads, head_dim=config.hd),
                 baseline=base, policy=pol, retained=retained)
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  (out / "report.md").write_text(report(results))
  plots(results, out)
  return results


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="YAML config, e.g. experiments/hybrid_8x.yaml")
  parser.add_argument("--out", default=None, help="output directory (overrides the config's out)")
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable)")
  parser.add_argument("--tiny", action="store_true", help="smoke run at length 256")
  parser.add_argument("--model_path", default=None, help="a Hugging Face Llama checkpoint directory")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  sets = tuple(args.sets) + ((f"out={args.out}",) if args.out else ())
  try:
    cfg = load_config(args.config, sets=sets, tiny=args.tiny)
    results = run(cfg, command=" ".join(["python experiments/run_experiment.py", *argv]),
                  model_path=args.model_path, progress=not args.no_progress)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  print(report(results))
  print(f"wrote {cfg.out}/results.json, report.md, accuracy.png, speed.png")
  return results


if __name__ == "__main__":
  main()
