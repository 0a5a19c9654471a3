"""RULER's scoring of generated text (NVIDIA/RULER scripts/eval/synthetic/constants.py and evaluate.py).

A prediction is first cleaned as RULER's postprocess_pred does (control characters become newlines, surrounding
whitespace is stripped), then compared to the references case-insensitively as substrings:

  string_match_all   the fraction of references found in the prediction (niah, vt, cwe, fwe)
  string_match_part  1 if any reference is found, else 0 (RULER's qa tasks)

Scores are in [0, 1]; RULER reports the batch mean times 100.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from akv_jax.tasks.text.prompt import TextSample

METRICS = ("all", "part")
_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
  """RULER's postprocess_pred: control characters to newlines, surrounding whitespace stripped."""
  if not isinstance(prediction, str):
    raise ValueError(f"prediction must be a str, got {type(prediction).__name__}")
  return _CONTROL.sub("\n", prediction.strip()).strip()


def _found(prediction: str, references: Sequence[str]) -> list[bool]:
  if isinstance(references, str) or not len(references):
    raise ValueError(f"references={references!r} must be a non-empty sequence of strings")
  pred = postprocess(prediction).lower()
  return [r.lower() in pred for r in references]


def string_match_all(prediction: str, references: Sequence[str]) -> float:
  """Fraction of `references` that occur in `prediction`, case-insensitively."""
  found = _found(prediction, references)
  return sum(found) / len(found)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
  """1.0 if any of `references` occurs in `prediction`, case-insensitively, else 0.0."""
  return float(any(_found(prediction, references)))


def score(prediction: str, sample: TextSample) -> float:
  """The sample's metric of the generated text (the continuation after the answer prefix), in [0, 1]."""
  if sample.metric == "all":
    return string_match_all(prediction, sample.outputs)
  if sample.metric == "part":
    return string_match_part(prediction, sample.outputs)
  raise ValueError(f"sample.metric={sample.metric!r} must be one of {', '.join(METRICS)}")


def score_batch(predictions: Sequence[str], samples: Sequence[TextSample]) -> dict[str, float]:
  """Mean score per task (in order of first appearance) and "average", the unweighted mean over those tasks."""
  if isinstance(predictions, str) or len(predictions) != len(samples):
    raise ValueError(f"predictions must be a sequence of {len(samples)} strings, one per sample")
  per_task: dict[str, list[float]] = {}
  for pred, s in zip(predictions, samples):
    per_task.setdefault(s.task, []).append(score(pred, s))
  out = {name: float(np.mean(v)) for name, v in per_task.items()}
  out["average"] = float(np.mean(list(out.values()))) if out else 0.0
  return out
