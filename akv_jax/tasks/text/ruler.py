"""The English RULER task registry, sample generation at a target token length, and deterministic sample sets."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from akv_jax.tasks.text.needles import NeedleTask, VariableTracking
from akv_jax.tasks.text.prompt import ChatFn, Plan, TextSample, Tokenizer, encode_parts, fit
from akv_jax.tasks.text.words import CommonWords, FrequentWords


class TextTask(Protocol):
  """An English task: draws a sample's randomness as a Plan whose text can be rendered at any haystack size."""

  name: str
  metric: str  # "all" or "part"
  max_new_tokens: int  # RULER's tokens_to_generate: decode steps a scorer should allow

  def plan(self, rng: np.random.Generator, length: int) -> Plan:
    ...


TASKS: dict[str, TextTask] = {t.name: t for t in (
    NeedleTask(name="niah_single_noise", haystack="noise"),                 # RULER niah_single_1
    NeedleTask(name="niah_single_shakespeare", haystack="shakespeare"),     # niah_single_2, essays -> plays
    NeedleTask(name="niah_multikey", haystack="shakespeare", num_keys=4),  # niah_multikey_1
    NeedleTask(name="niah_multivalue", haystack="shakespeare", num_values=4),
    NeedleTask(name="niah_multiquery", haystack="shakespeare", num_keys=4, num_queries=4),
    VariableTracking(),                                                      # vt: 1 chain, 4 hops, noise
    CommonWords(),                                                           # cwe: 30 / 3 repeats, 10 words
    FrequentWords(),                                                         # fwe: alpha 2
)}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str) -> TextTask:
  """The registered task called `name` (see `TASK_NAMES`)."""
  try:
    return TASKS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def generate(task: str | TextTask, rng: np.random.Generator, length: int, tokenizer: Tokenizer,
             chat: ChatFn | None = None) -> TextSample:
  """One sample whose prompt, rendered through `chat` and tokenized, has at most and about `length` tokens.

  The haystack size is searched (see `prompt.fit`) so that len(context_ids) + len(question_ids) <= length and
  adding one haystack unit (a noise sentence, a play line, a distinct word or one Zipf unit) would pass it; the
  shortfall is therefore below one unit's tokens: measured at 1k-128k, at most 24 tokens on SmolLM2's tokenizer
  and under 64 on the 2000-token BPE of the tests (a Zipf step can add several fwe words at once).

  Args:
    task: a task name (a key of `TASKS`) or a task object.
    rng: the only source of randomness; the same generator state gives the same sample.
    length: target prompt tokens (RULER's max_seq_length without the tokens to generate).
    tokenizer: a `tokenizers.Tokenizer`; text is encoded with add_special_tokens=False, so chat-template markers
      that are the tokenizer's added special tokens encode as their single ids, and no BOS is added (put it in
      the `chat` rendering if the model needs one).
    chat: maps the user text to the full rendered prompt up to and including the assistant header; None feeds the
      raw text. It must contain the user text verbatim.

  Raises:
    ValueError: an unknown task, a length that is not a positive int, too short for the task's template and
      needles on this tokenizer, or longer than its haystack can fill; a `chat` that does not render the user text.
  """
  t = get_task(task) if isinstance(task, str) else task
  if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
    raise ValueError(f"length={length!r} must be an int >= 1")
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f"rng={rng!r} must be a numpy.random.Generator")
  length = int(length)
  plan = t.plan(rng, length)
  encoded: dict[int, tuple] = {}

  def total(n: int) -> int:
    parts = plan.render(n)
    ids = encode_parts(parts, tokenizer, chat)
    encoded[n] = (parts, ids)
    return len(ids[0]) + len(ids[1])

  n = fit(total, plan.lo, plan.hi, length, t.name)
  parts, (context_ids, question_ids) = encoded[n]
  return TextSample(task=t.name, context=parts.context, question=parts.question, answer_prefix=parts.answer_prefix,
                    outputs=parts.outputs, metric=t.metric, context_ids=context_ids, question_ids=question_ids,
                    depth=parts.depth)


def make_samples(task: str | TextTask, n: int, length: int, tokenizer: Tokenizer, chat: ChatFn | None = None,
                 seed: int = 0) -> tuple[TextSample, ...]:
  """`n` samples of one task from np.random.default_rng(seed): the same arguments give identical samples."""
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
    raise ValueError(f"n={n!r} must be an int >= 1")
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise ValueError(f"seed={seed!r} must be an int >= 0")
  rng = np.random.default_rng(int(seed))
  return tuple(generate(task, rng, length, tokenizer, chat) for _ in range(int(n)))
