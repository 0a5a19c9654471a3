"""Every policy against the full cache on the shipped model, in one run: the README's headline table and plots.

    python experiments/sweep.py --out experiments/results/sweep_2048 [--set key=value ...] [--tiny]
        [--policies full,streaming,...]

The same measurements as run_experiment.py (experiments/model_eval.py), with the baseline evaluated once and every
policy on the same prompts, reading its settings from experiments/baseline_full.yaml (override with --set). Writes
OUT/results.json, OUT/report.md and the plots accuracy_vs_ratio.png (with the full-cache line),
memory_vs_ratio.png and speed_vs_batch.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

if __package__ in (None, ""):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import akv_jax as akv  # noqa: E402
from experiments import model_eval, result_files  # noqa: E402
from experiments import run_experiment as rx  # noqa: E402

POLICIES = ("full", "streaming", "snapkv", "pyramidkv", "adakv", "h2o", "tova", "knorm", "kivi4", "kivi2",
            "hybrid_5x", "hybrid_8x", "hybrid_12x")


def table(results: dict) -> str:
  length = results["length"]
  rows = results["policies"]
  names = [n for n in next(iter(rows.values()))["accuracy"][length] if n != "average"]
  b = results["config"]["speed_batches"][-1]
  lines = ["| policy | ratio | average | retained | " + " | ".join(names) + f" | TPOT ms (B={b}) | tokens/s (B={b}) |",
           "|---|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|"]
  for name, e in rows.items():
    acc = e["accuracy"][length]
    sp = e["speed"][-1]
    lines.append(f"| `{name}` | {e['compression_ratio']:.2f}x | {acc['average']:.3f} | {e['retained']:.3f} | "
                 + " | ".join(f"{acc[n]:.2f}" for n in names) + f" | {sp['tpot_ms']:.1f} | {sp['tokens_per_s']:.0f} |")
  return "\n".join(lines)


def plots(results: dict, out: pathlib.Path) -> None:
  length, rows = results["length"], results["policies"]
  full = rows["full"]["accuracy"][length]["average"] if "full" in rows else None
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for name, e in rows.items():
    ax.scatter(e["compression_ratio"], e["accuracy"][length]["average"])
    ax.annotate(name, (e["compression_ratio"], e["accuracy"][length]["average"]), fontsize=7)
  if full is not None:
    ax.axhline(full, color="gray", ls="--", label="full cache")
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


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="experiments/baseline_full.yaml")
  parser.add_argument("--out", default="experiments/results/sweep_2048")
  parser.add_argument("--policies", default=",".join(POLICIES))
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    cfg = rx.load_config(args.config, sets=tuple(args.sets) + (f"out={args.out}",), tiny=args.tiny)
    names = args.policies.split(",")
    for name in names:
      akv.presets.get(name)
    config, params, _ = rx.load_model(cfg, None)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  prompts = model_eval.draw_prompts(cfg.tasks, cfg.lengths, cfg.samples, cfg.batch, cfg.seed)
  length = str(cfg.lengths[-1])
  rows = {}
  for name in ([cfg.baseline] if cfg.baseline not in names else []) + names:
    rows[name] = rx.evaluate(cfg, config, params, prompts, name, progress=not args.no_progress)
    print(f"{name}: ratio {rows[name]['compression_ratio']}x, average "
          f"{rows[name]['accuracy'][length]['average']:.3f} ({rows[name]['seconds']} s)", flush=True)
  base = rows[cfg.baseline]["accuracy"][length]["average"]
  for e in rows.values():
    e["retained"] = e["accuracy"][length]["average"] / base if base > 0 else float("nan")
  results = dict(command=" ".join(["python experiments/sweep.py", *argv]), config=dataclasses.asdict(cfg),
                 machine=result_files.machine(), model=dict(source=cfg.model, dtype=cfg.dtype,
                                                  params=int(sum(x.size for x in jax.tree_util.tree_leaves(params)))),
                 length=length, baseline=cfg.baseline, policies=rows)
  out = pathlib.Path(cfg.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
  md = (f"# Every policy vs {cfg.baseline}, {length} tokens, {cfg.samples} prompts per task\n\n"
        f"Command: `{results['command']}`; machine: {results['machine']['device_kind']}, "
        f"{results['machine']['cpu_count']} cores, jax {results['machine']['jax']}\n\n{table(results)}\n")
  (out / "report.md").write_text(md)
  plots(results, out)
  print(md)
  return results


if __name__ == "__main__":
  main()
