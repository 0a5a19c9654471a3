"""The synthetic-data runner: one policy against a baseline on a KV artifact (no model), from a YAML config.

Usage:
  python experiments/synthetic/run_proxy_experiment.py --config experiments/synthetic/proxy_hybrid_8x.yaml
      [--out DIR] [--set key=value ...] [--tiny]

It measures what compression does to a cache's keys, values and attention outputs (run_quality_benchmarks.py), on
an artifact generated from a seed (synthetic.py) or captured from a model (make_artifacts.py): proxy figures, not
model accuracy. Policy-vs-full evaluations on a model are experiments/run_real.py (SmolLM2, the main job) and
experiments/toy/sweep.py (the tiny trained model).

Config fields (anything else is an error that names it):
  policy:         preset name to evaluate (required; see akv_jax.presets.names()).
  baseline:       preset name to compare against (default "full").
  fit_named:      presets named for a ratio (hybrid_8x) meet it on the artifact's shape (their byte target;
                  default true); false: their fixed keep (akv.presets.fixed), as --tiny runs them.
  artifact:       SyntheticConfig fields (seq_len, layers, batch, kv_heads, q_heads, head_dim, window,
                  test_queries, seed, and the structure knobs of experiments/synthetic/synthetic.py): generate
                  the artifact.
  artifact_path:  or load one written by experiments/synthetic/synthetic.py (.npz or orbax directory).
  out:            output directory (default out/synthetic_<policy>); --out overrides it.

Overrides are applied in order (experiments/config_files.py reads the file and applies each --set): the YAML
file, then --tiny (a ~20 s smoke run: a tiny generated artifact, output to <out>-tiny unless --out is given), then
each --set (dotted keys, YAML-typed values: --set artifact.seq_len=1024).
Writes DIR/results.json (see run_quality_benchmarks.py, plus the resolved config) and DIR/report.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import yaml

import akv_jax as akv
from experiments import config_files, result_files
from experiments.synthetic import run_quality_benchmarks as rqb
from experiments.synthetic import synthetic

FIELDS = ("policy", "baseline", "fit_named", "artifact", "artifact_path", "out")
# Smallest artifact every preset accepts: S must hold the hybrid presets' 4 sinks + 128-token recent window at
# keep=0.4, and W the SnapKV window of 32.
TINY_ARTIFACT = dict(seq_len=512, layers=2, batch=2, kv_heads=2, q_heads=4, head_dim=64, window=32,
                     test_queries=4, min_length_frac=0.75)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A resolved, validated experiment config."""

  policy: str
  baseline: str
  fit_named: bool   # presets named for a ratio meet it on the artifact; false: their fixed keep (--tiny)
  artifact: synthetic.SyntheticConfig | None
  artifact_path: str | None
  out: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def resolve(raw: dict[str, Any], *, source: str = "config") -> ExperimentConfig:
  """Validates a raw config dict; errors name the offending field and value."""
  if not isinstance(raw, dict):
    raise ValueError(f"{source} must be a mapping of {FIELDS}, got {type(raw).__name__}")
  unknown = [k for k in raw if k not in FIELDS]
  if unknown:
    raise ValueError(f"unknown config field {unknown[0]!r} in {source}; known fields: {', '.join(FIELDS)}")
  if raw.get("policy") is None:
    raise ValueError(f"{source} needs a 'policy' field naming a preset ({', '.join(akv.presets.names())})")
  names = {}
  for field in ("policy", "baseline"):
    name = raw.get(field, "full")
    if not isinstance(name, str):
      raise ValueError(f"config field {field} must be a preset name, got {name!r}")
    try:
      akv.presets.get(name)
    except ValueError as e:
      raise ValueError(f"config field {field}: {e}") from None
    names[field] = name
  fit_named = raw.get("fit_named", True)
  if not isinstance(fit_named, bool):
    raise ValueError(f"config field fit_named must be true or false, got {fit_named!r}")
  artifact, path = raw.get("artifact"), raw.get("artifact_path")
  if artifact is not None and path is not None:
    raise ValueError(f"{source} gives both artifact and artifact_path={path!r}; keep one")
  if path is not None and not isinstance(path, str):
    raise ValueError(f"config field artifact_path must be a path, got {path!r}")
  if artifact is not None and not isinstance(artifact, dict):
    raise ValueError(f"config field artifact must be a mapping of {synthetic.field_names()}, got {artifact!r}")
  cfg = None if path is not None else synthetic.config_from_dict(artifact or {})
  out = raw.get("out") or f"out/synthetic_{names['policy']}"
  return ExperimentConfig(policy=names["policy"], baseline=names["baseline"], fit_named=fit_named, artifact=cfg,
                          artifact_path=path, out=str(out))


def load_config(path: str, *, sets: tuple[str, ...] = (), tiny: bool = False) -> ExperimentConfig:
  """Reads the YAML at `path`, applies --tiny then the --set overrides, and validates."""
  raw = config_files.read(path)
  if tiny:
    if raw.get("artifact_path") is not None:
      raise ValueError(f"--tiny shrinks the generated artifact; {path} loads artifact_path="
                       f"{raw['artifact_path']!r} instead")
    raw["artifact"] = {**(raw.get("artifact") or {}), **TINY_ARTIFACT}
    raw["fit_named"] = False   # no ratio target is reachable at the tiny artifact's length
  for assignment in sets:
    config_files.apply_set(raw, assignment)
  cfg = resolve(raw, source=path)
  if tiny and not any(s.startswith("out=") for s in sets):
    cfg = dataclasses.replace(cfg, out=f"{cfg.out}-tiny")  # never overwrite the full run's results
  return cfg


def report_markdown(results: dict, cfg: ExperimentConfig, command: str) -> str:
  machine = results["machine"]
  lines = [
      f"# {cfg.policy} vs {cfg.baseline}",
      "",
      f"Command: `{command}`",
      "",
      f"Artifact: {results['artifact']['path'] or 'generated'}, {results['artifact']['shape']}",
      "",
      f"Machine: {machine['device_kind']} ({machine['backend']}), {machine['machine']} "
      f"{machine['processor'] or ''}, {machine['cpu_count']} cores, jax {machine['jax']}; "
      f"total {results['seconds']:.1f} s (generation {results['generate_seconds']:.1f} s)",
      "",
      "Ratio: bf16 dense bytes / bytes held, over all layers. Errors and attention masses: means over layers; "
      "out err: attention output relative error of each test query (one token after the prompt), averaged.",
      "",
      rqb.markdown_table(results),
      "",
  ]
  for name, entry in results["policies"].items():
    lines += [f"## {name} per layer", "", rqb.markdown_layers(entry), ""]
  lines += ["## Config", "", "```yaml", yaml.safe_dump(results["config"], sort_keys=False).rstrip(), "```", ""]
  return "\n".join(lines)


def run(cfg: ExperimentConfig, *, out: str | None = None, command: str = "", show_progress: bool = True) -> dict:
  """Runs the experiment and writes results.json and report.md into `out` (default cfg.out)."""
  out_dir = pathlib.Path(out or cfg.out)
  start = time.perf_counter()
  if cfg.artifact_path is not None:
    artifact = synthetic.load_artifact(cfg.artifact_path)
  else:
    artifact = synthetic.generate(cfg.artifact)
  generated = time.perf_counter()
  preset = akv.presets.get if cfg.fit_named else akv.presets.fixed
  policies = [preset(n) for n in ([cfg.baseline] if cfg.baseline == cfg.policy else [cfg.baseline, cfg.policy])]
  results = rqb.run(artifact, policies, artifact_path=cfg.artifact_path, show_progress=show_progress)
  results["config"] = cfg.to_dict()
  results["command"] = command
  results["generate_seconds"] = generated - start
  results["seconds"] = time.perf_counter() - start
  out_dir.mkdir(parents=True, exist_ok=True)
  result_files.write_json(out_dir / "results.json", results)
  (out_dir / "report.md").write_text(report_markdown(results, cfg, command))
  return results


def main(argv: list[str] | None = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True, help="YAML config, e.g. experiments/synthetic/proxy_hybrid_8x.yaml")
  parser.add_argument("--out", default=None, help="output directory (overrides the config's out)")
  parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config field, dotted for nested ones (repeatable)")
  parser.add_argument("--tiny", action="store_true", help="tiny smoke run (~20 s)")
  parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
  args = parser.parse_args(argv)
  try:
    cfg = load_config(args.config, sets=tuple(args.sets), tiny=args.tiny)
  except (ValueError, OSError) as e:
    raise SystemExit(f"error: {e}") from e
  command = result_files.command_line("synthetic/run_proxy_experiment.py", argv)
  results = run(cfg, out=args.out, command=command, show_progress=not args.no_progress)
  out_dir = pathlib.Path(args.out or cfg.out)
  print(rqb.format_table(results))
  print(f"{results['seconds']:.1f} s; wrote {out_dir / 'results.json'} and {out_dir / 'report.md'}")
  return results


if __name__ == "__main__":
  main()
