"""Plots the experiment scripts share: continuation quality against the measured compression ratio."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def continuation_vs_ratio(rows: dict[str, dict], path: str | pathlib.Path, *, title: str,
                          family: Callable[[str], str] = lambda name: name) -> None:
  """NLL rise (%) and top-1 agreement of each policy (real_eval.continuation's rows) against its measured ratio,
  one line per family (`family(policy name)`, points sorted by ratio); the full cache is left out (it is the
  reference both are measured against)."""
  groups: dict[str, list[tuple[float, float, float]]] = {}
  for name, row in rows.items():
    if name == "full":
      continue
    groups.setdefault(family(name), []).append((row["compression_ratio"], 100 * row["nll_rise"],
                                                row["top1_agreement"]))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for label, points in groups.items():
    points.sort()
    for ax, col in zip(axes, (1, 2)):
      ax.plot([p[0] for p in points], [p[col] for p in points], "o-", lw=1, label=label)
  for ax, ylabel in zip(axes, ("continuation NLL rise over the full cache (%)", "top-1 agreement with the full cache")):
    ax.set_xlabel("measured compression ratio (bf16 bytes / held bytes)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
