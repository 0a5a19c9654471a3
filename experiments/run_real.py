"""The main job: compression policies against the full cache on a real pretrained model (SmolLM2-135M-Instruct).

    python experiments/run_real.py --config experiments/smollm2_hybrid_8x.yaml [--out DIR] [--set key=value ...]
        [--tiny]

One run evaluates the baseline (the full cache) and every listed policy on identical prompts, from one forward
pass per prompt batch (experiments/real_eval.py says exactly how): RULER scores per task in each mode
(question-aware and/or question-agnostic), the KV bytes each cache holds and the measured compression ratio, the
teacher-forced continuation of Shakespeare plays (NLL, perplexity ratio, top-1 agreement and KL against the full
cache), and optionally TTFT / TPOT after warm-up. It writes DIR/results.json, DIR/report.md, DIR/accuracy.png and
DIR/quality.png (accuracy and NLL against the measured ratio).

Config fields (anything else is an error naming it):
  policies        presets, preset@keep (snapkv@0.125) or preset@ratio (snapkv@8x: keep fitted to measure 8x on this
                  model at `length`); baseline: the reference (default full)
  fit_named       presets named for a ratio (hybrid_8x) meet it on this model at `length`: their byte target,
                  solved once here (akv_jax.ratios.fit_keep); false: their fixed keep (akv.presets.fixed)
  dtype, kv_dtype model activations and cache dtype (default float32 with a bfloat16 cache: fastest on a CPU)
  tasks, length   akv_jax.tasks.text task names and the prompt length in tokens on the model's tokenizer
  samples, batch  prompts per task, and rows per forward pass
  modes           [aware], [agnostic] or both
  max_new_tokens  cap on each task's RULER allowance (answers stop earlier at the end of the turn)
  plays, prefixes, continuation_tokens   continuation: plays, prefill lengths S, tokens teacher-forced after S
  speed_batches, speed_length, decode_steps, reps   TTFT / TPOT (empty speed_batches: not measured)
  seed, out
Overrides apply in order: the YAML, then --tiny (a random 2-layer model with SmolLM2's tokenizer, 512-token
prompts: the pipeline's smoke test), then each --set key=value.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import akv_jax as akv  # noqa: E402
from akv_jax.tasks import text  # noqa: E402
from experiments import config_files, model_eval, real_eval, result_files  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class RealConfig:
  policies: tuple[str, ...]
  baseline: str = "full"
  fit_named: bool = True
  dtype: str = "float32"
  kv_dtype: str | None = "bfloat16"
  tasks: tuple[str, ...] = tuple(text.TASK_NAMES)
  length: int = 4096
  samples: int = 2
  batch: int = 4
  modes: tuple[str, ...] = ("aware",)
  max_new_tokens: int = 64
  plays: tuple[str, ...] = ("hamlet",)
  prefixes: tuple[int, ...] = (4096,)
  continuation_tokens: int = 512
  speed_batches: tuple[int, ...] = ()
  speed_length: int = 4096
  decode_steps: int = 16
  reps: int = 2
  seed: int = 0
  tiny: bool = False
  out: str = ""

  def __post_init__(self):
    if not self.policies:
      raise ValueError("config field policies is empty: name at least one policy")
    for name in (self.baseline, *self.policies):
      try:   # names only: fitting waits for the model's shape
        akv.presets.get(name.partition("@")[0])
        if "@" in name and not name.endswith("x"):
          real_eval.resolve_policy(name)
      except ValueError as e:
        raise ValueError(f"config field policies/baseline: {e}") from None
    for name in self.tasks:
      text.get_task(name)
    for mode in self.modes:
      if mode not in real_eval.MODES:
        raise ValueError(f"config field modes: {mode!r} is not one of {real_eval.MODES}")
    for name in self.plays:
      text.play_text(name)   # an unknown play raises, naming it and listing the others (the text is cached)
    for field in ("length", "samples", "batch", "max_new_tokens", "continuation_tokens", "speed_length",
                  "decode_steps", "reps"):
      value = getattr(self, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config field {field}={value!r} must be an int >= 1")
    for field in ("prefixes", "speed_batches"):
      if any(not isinstance(v, int) or v < 1 for v in getattr(self, field)):
        raise ValueError(f"config field {field}={list(getattr(self, field))!r} must list ints >= 1")


TINY = dict(tiny=True, fit_named=False, length=512, samples=1, batch=2, tasks=["niah_single_noise", "niah_multikey"],
            max_new_tokens=8, prefixes=[256], continuation_tokens=16, speed_batches=[1], speed_length=256,
            decode_steps=3, reps=1)


def load_config(path: str, *, sets: tuple[str, ...] = (), tiny: bool = False) -> RealConfig:
  return config_files.load(path, RealConfig, required="policies", required_hint="listing policies to evaluate",
                           sets=sets, tiny=TINY if tiny else None, default_out="out/{cfg.policies[0]}")


def speed(model: real_eval.RealModel, policy, batches, length: int, decode_steps: int, reps: int) -> list[dict]:
  """TTFT (a jitted prefill that compresses every layer) and TPOT (mean of decode_steps - 1 steps) per batch size,
  after a warm-up call, on the first `length` tokens of Hamlet (real text, every row the same length)."""
  rows = []
  seq = real_eval.play_tokens(model, ["hamlet"], length)
  for b in batches:
    toks = jnp.broadcast_to(seq, (b, length))
    lens = jnp.full((b,), length, jnp.int32)
    t = model_eval.time_prefill_decode(model.config, model.params, toks, lens, policy, decode_steps=decode_steps,
                                       reps=reps, reconstruction=model.reconstruction(chat=False))
    rows.append(dict(batch=b, length=length, ttft_ms=round(t["ttft_ms"], 1), tpot_ms=round(t["tpot_ms"], 2),
                     tokens_per_s=round(b / t["tpot_ms"] * 1e3, 2)))
  return rows


def _earlier(cfg: RealConfig, out: pathlib.Path) -> dict:
  """The stages an earlier run of the same config finished (its results.json), for --resume."""
  file = out / "results.json"
  if not file.is_file():
    return {}
  earlier = json.loads(file.read_text())
  # Stage lists may differ (a run of modes=[aware] resumed by one of [aware, agnostic]); nothing else may.
  stages = ("modes", "prefixes", "speed_batches")
  mine = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items() if k not in stages}
  if {k: v for k, v in earlier.get("config", {}).items() if k not in stages} != mine:
    raise ValueError(f"{file} was written by another config; --resume continues only the same one, with other "
                     "modes or prefixes at most (remove the file, or pass another --out)")
  return earlier


def run(cfg: RealConfig, *, command: str = "", progress: bool = True, resume: bool = False) -> dict:
  start = time.perf_counter()
  max_len = max([cfg.length + cfg.max_new_tokens + 128, *(p + cfg.continuation_tokens for p in cfg.prefixes)])
  model = real_eval.load_smollm2(dtype=cfg.dtype, kv_dtype=cfg.kv_dtype)
  if cfg.tiny:
    model = real_eval.random_model(model)
  if max_len > model.config.max_seq_len:
    raise ValueError(f"length {cfg.length} / prefixes {list(cfg.prefixes)} need {max_len} positions; the model "
                     f"has a context of {model.config.max_seq_len}")
  names = [cfg.baseline] + [p for p in cfg.policies if p != cfg.baseline]
  shape = real_eval.cache_shape(model, cfg.length)
  policies = [real_eval.resolve_policy(n, shape, fit_named=cfg.fit_named) for n in names]
  samples = real_eval.draw_samples(model, cfg.tasks, cfg.length, cfg.samples, cfg.seed)
  c = model.config
  results = dict(command=command, config=dataclasses.asdict(cfg), machine=result_files.machine(),
                 model=dict(source=model.name, dtype=cfg.dtype, kv_dtype=cfg.kv_dtype, layers=c.num_layers,
                            kv_heads=c.num_kv_heads, head_dim=c.hd,
                            params=int(sum(x.size for x in jax.tree_util.tree_leaves(model.params)))),
                 policies={p.name: dataclasses.asdict(p) for p in policies}, tasks={}, continuation={}, speed={},
                 complete=False, seconds=None)
  out = pathlib.Path(cfg.out)
  earlier = _earlier(cfg, out) if resume else {}
  results["resumed"] = sorted([f"tasks/{m}" for m in earlier.get("tasks", {})]
                              + [f"continuation/{p}" for p in earlier.get("continuation", {})]
                              + [f"tasks/{m}: {st['batches']} batches" for m, st in earlier.get("partial", {}).items()])
  spent = earlier.get("seconds") or 0.0

  def save(final: bool = False):
    # Written after every stage, so a long run that is cut keeps what it finished (complete says which it is).
    results["seconds"] = round(spent + time.perf_counter() - start, 1)
    results["complete"] = final
    out.mkdir(parents=True, exist_ok=True)
    result_files.write_json(out / "results.json", results)
    (out / "report.md").write_text(report(results))

  for mode in cfg.modes:
    if mode in earlier.get("tasks", {}):
      results["tasks"][mode] = earlier["tasks"][mode]
      continue

    def batch_done(state, mode=mode):
      results.setdefault("partial", {})[mode] = state
      save()

    entry = real_eval.accuracy(model, policies, samples, mode=mode, batch=cfg.batch,
                               max_new_tokens=cfg.max_new_tokens, progress=progress,
                               partial=earlier.get("partial", {}).get(mode), on_batch=batch_done)
    results.get("partial", {}).pop(mode, None)
    base = entry["policies"][cfg.baseline]["accuracy"]
    solved = [t for t in cfg.tasks if base[t] > 0]
    entry["solved_by_baseline"] = solved
    for pol in entry["policies"].values():
      pol["retained"] = (round(sum(pol["accuracy"][t] for t in solved) / sum(base[t] for t in solved), 4)
                         if solved else None)
    results["tasks"][mode] = entry
    save()
  for prefix in cfg.prefixes:
    if str(prefix) in earlier.get("continuation", {}):
      results["continuation"][str(prefix)] = earlier["continuation"][str(prefix)]
      continue
    results["continuation"][str(prefix)] = real_eval.continuation(model, policies, cfg.plays, prefix,
                                                                  cfg.continuation_tokens, progress=progress)
    save()
  for name, pol in zip(names, policies) if cfg.speed_batches else ():
    results["speed"][name] = speed(model, pol, cfg.speed_batches, cfg.speed_length, cfg.decode_steps, cfg.reps)
  save(final=True)
  plots(results, out)
  return results


def report(results: dict) -> str:
  cfg, m = results["config"], results["machine"]
  lines = [f"# {', '.join(cfg['policies'])} vs {cfg['baseline']} on {results['model']['source']}"
           + ("" if results["complete"] else " (incomplete: the run was cut)"), "",
           f"Command: `{results['command']}`", "",
           f"Model: {results['model']}; machine: {m['device_kind']} ({m['backend']}), {m['cpu_count']} cores, "
           f"jax {m['jax']}; {results['seconds']} s in all.", ""]
  for mode, entry in results["tasks"].items():
    pols = entry["policies"]
    names = list(next(iter(pols.values()))["accuracy"])
    lines += [f"## Tasks, question-{mode}, {cfg['length']} tokens, {cfg['samples']} prompts per task", "",
              f"Tasks the full cache solves at least once: {', '.join(entry['solved_by_baseline']) or 'none'}; "
              "retained = the policy's summed score on them over the baseline's.", "",
              "| policy | ratio | " + " | ".join(names) + " | retained |", "|---|---:|" + "---:|" * (len(names) + 1)]
    for name, e in pols.items():
      lines.append(f"| {name} | {e['compression_ratio']}x | " + " | ".join(f"{e['accuracy'][n]:.3f}" for n in names)
                   + f" | {e['retained']} |")
    lines.append("")
  for prefix, entry in results["continuation"].items():
    lines += [f"## Continuation: {entry['tokens']} tokens after {prefix} of {', '.join(entry['plays'])}", "",
              "| policy | ratio | NLL | ppl | ppl ratio | NLL rise | top-1 agreement | KL |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in entry["policies"].items():
      lines.append(f"| {name} | {e['compression_ratio']}x | {e['nll']} | {e['ppl']} | {e['ppl_ratio']} | "
                   f"{100 * e['nll_rise']:.2f}% | {e['top1_agreement']} | {e['kl']} |")
    lines.append("")
  if results["speed"]:
    lines += ["## Speed", "", "| policy | batch | length | TTFT ms | TPOT ms | tokens/s |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in results["speed"].items():
      for r in rows:
        lines.append(f"| {name} | {r['batch']} | {r['length']} | {r['ttft_ms']} | {r['tpot_ms']} | "
                     f"{r['tokens_per_s']} |")
  return "\n".join(lines) + "\n"


def plots(results: dict, out: pathlib.Path) -> None:
  """accuracy.png: per-task scores per policy and mode; quality.png: the average task score of each mode and the
  continuation NLL of each prefix against the measured ratio, one line per method family."""
  modes = list(results["tasks"])
  if modes:
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 3.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
      pols = results["tasks"][mode]["policies"]
      names = list(next(iter(pols.values()))["accuracy"])
      width = 0.8 / len(pols)
      for i, (pname, e) in enumerate(pols.items()):
        ax.bar([j + i * width for j in range(len(names))], [e["accuracy"][n] for n in names], width,
               label=f"{pname} ({e['compression_ratio']}x)")
      ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=35, ha="right", fontsize=7)
      ax.set_title(f"question-{mode}")
      ax.set_ylim(0, 1.05)
      ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
  panels = [(f"question-{m}", results["tasks"][m]["policies"], lambda e: e["accuracy"]["average"],
             "average task score") for m in modes]
  panels += [(f"continuation after {p}", entry["policies"], lambda e: e["nll"], "NLL per token")
             for p, entry in results["continuation"].items()]
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
  for ax, (title, pols, value, ylabel) in zip(axes[0], panels):
    by_family: dict[str, list] = {}
    for name, e in pols.items():
      by_family.setdefault(family(name), []).append((e["compression_ratio"], value(e), name))
    for fam, points in by_family.items():
      points.sort()
      ax.plot([x for x, _, _ in points], [y for _, y, _ in points], "o-" if len(points) > 1 else "o", label=fam,
              ms=4, lw=1)
      for x, y, name in points:
        ax.annotate(name, (x, y), fontsize=5)
    ax.set_xlabel("measured compression ratio")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
  axes[0][0].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(out / "quality.png", dpi=120)
  plt.close(fig)


def family(name: str) -> str:
  """A policy's method family for the plots' lines: the preset before any @keep / @ratio, with kivi2/kivi4 and
  the hybrids each one family."""
  base = name.partition("@")[0]
  for prefix in ("kivi", "hybrid"):
    if base.startswith(prefix):
      return prefix
  return base


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="YAML config, e.g. experiments/smollm2_hybrid_8x.yaml")
  parser.add_argument("--out", default=None, help="output directory (overrides the config's out)")
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field (repeatable)")
  parser.add_argument("--tiny", action="store_true", help="smoke run: random 2-layer model, 512-token prompts")
  parser.add_argument("--resume", action="store_true",
                      help="keep the stages (modes, continuation prefixes) an earlier run of this config finished "
                           "(its stage lists may differ)")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  sets = tuple(args.sets) + ((f"out={args.out}",) if args.out else ())
  try:
    cfg = load_config(args.config, sets=sets, tiny=args.tiny)
    results = run(cfg, command=" ".join(["python experiments/run_real.py", *argv]), progress=not args.no_progress,
                  resume=args.resume)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  print(report(results))
  print(f"wrote {cfg.out}/results.json, report.md, accuracy.png, quality.png")
  return results


if __name__ == "__main__":
  main()
