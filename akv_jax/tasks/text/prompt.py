"""The text sample, the chat-template split into context and question tokens, and the haystack-size search.

A task renders a user turn as  context + question  (context: instruction and haystack; question: the text after
the haystack) plus RULER's answer prefix, which opens the assistant turn. `encode_parts` renders the user turn
through the chat template, cuts the rendered string where the question starts and tokenizes the two halves
apart, so  context_ids + question_ids  is exactly what the model reads in both evaluation modes: question-aware
(prefill it all) and question-agnostic (prefill and compress context_ids, then extend by question_ids).

`fit` is RULER's binary search over the haystack size (sentences, lines or words), made cheaper by interpolation:
token counts grow almost linearly with the haystack, so 4-8 tokenizations usually settle it. The total it returns
is <= the target and less than one haystack unit's tokens below it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Hashable, Iterable, Protocol

# Maps the user text to the full rendered prompt up to and including the assistant header; None: raw text.
ChatFn = Callable[[str], str]


class Tokenizer(Protocol):
  """What the tasks need of a `tokenizers.Tokenizer`."""

  def encode(self, sequence: str, add_special_tokens: bool = ...):  # -> an Encoding with .ids
    ...


@dataclasses.dataclass(frozen=True)
class TextSample:
  """One English RULER sample, tokenized.

  Attributes:
    task: name of the task that made it (a key of `TASKS`).
    context: the user text up to and including the haystack (instruction, few-shot example if any, haystack).
    question: the user text after the haystack (it starts with the newline that ends the haystack).
    answer_prefix: RULER's answer prefix, which starts the assistant turn.
    outputs: the reference answers.
    metric: "all" (RULER's string_match_all) or "part" (string_match_part).
    context_ids: tokens of the rendered prompt up to the end of the haystack (chat header included).
    question_ids: tokens of the rest: question, end of the user turn, assistant header, answer prefix.
    depth: position of the first needle the answer needs, as the fraction of haystack units before it (0: at the
      start, 1: at the end); None for the word-frequency tasks, whose answer depends on the whole haystack.
  """

  task: str
  context: str
  question: str
  answer_prefix: str
  outputs: tuple[str, ...]
  metric: str
  context_ids: tuple[int, ...]
  question_ids: tuple[int, ...]
  depth: float | None

  @property
  def length(self) -> int:
    """Prompt tokens the model reads: len(context_ids) + len(question_ids)."""
    return len(self.context_ids) + len(self.question_ids)

  @property
  def prompt_ids(self) -> tuple[int, ...]:
    return self.context_ids + self.question_ids


@dataclasses.dataclass(frozen=True)
class Parts:
  """A task's text at one haystack size, before the chat template and tokenization."""

  context: str
  question: str
  answer_prefix: str
  outputs: tuple[str, ...]
  depth: float | None


def check_int(name: str, value: int, low: int) -> None:
  """Raise unless `value` is an int (not a bool) >= low."""
  if not isinstance(value, int) or isinstance(value, bool) or value < low:
    raise ValueError(f"{name}={value!r} must be an int >= {low}")


def distinct(draw: Callable[[int], Iterable[Hashable]], count: int) -> list:
  """`count` distinct items from repeated calls of draw(k) -> k items, first-drawn order kept."""
  out: dict = {}
  while len(out) < count:
    for item in draw(count - len(out)):
      out.setdefault(item, None)
  return list(out)[:count]


def encode(tokenizer: Tokenizer, text: str) -> tuple[int, ...]:
  return tuple(tokenizer.encode(text, add_special_tokens=False).ids)


def split_rendered(parts: Parts, chat: ChatFn | None) -> tuple[str, str]:
  """(head, tail): the rendered prompt cut where the question starts; the answer prefix ends the tail."""
  user = parts.context + parts.question
  rendered = user if chat is None else chat(user)
  if not isinstance(rendered, str):
    raise ValueError(f"chat returned {type(rendered).__name__}; it must return the rendered prompt as a str")
  cut = rendered.rfind(parts.question)
  if cut < 0 or not rendered[:cut].endswith(parts.context):
    raise ValueError("chat must render the user text verbatim; the rendered prompt does not contain the context "
                     f"followed by the question {parts.question[:60]!r}")
  return rendered[:cut], rendered[cut:] + parts.answer_prefix


def encode_parts(parts: Parts, tokenizer: Tokenizer, chat: ChatFn | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(context_ids, question_ids) of `parts` rendered through `chat`."""
  head, tail = split_rendered(parts, chat)
  return encode(tokenizer, head), encode(tokenizer, tail)


def fit(total: Callable[[int], int], lo: int, hi: int, length: int, name: str) -> int:
  """The largest haystack size n in [lo, hi] with total(n) <= length, for total nondecreasing (almost) in n.

  Brackets the answer by extrapolating from the sizes measured so far, then narrows the bracket by linear
  interpolation, bisecting whenever interpolation stops halving it. Ends with total(n) <= length < total(n + 1)
  (or n == hi), so the total is within one haystack unit's tokens of `length`.

  Raises:
    ValueError: total(lo) > length (the prompt without haystack does not fit), or total(hi) <= length (the
      haystack source runs out before the length is reached).
  """
  seen: dict[int, int] = {}

  def f(n: int) -> int:
    if n not in seen:
      seen[n] = total(n)
    return seen[n]

  a, fa = lo, f(lo)
  if fa > length:
    raise ValueError(f"length={length} is too short for {name}: its template, needles and smallest haystack take "
                     f"{fa} tokens on this tokenizer, so the length must be at least {fa}")
  # Bracket: a fits, b does not. Probe a few units, then aim just past the target along the measured slope.
  x = min(hi, lo + 8)
  b = fb = None
  while b is None:
    if x == a:
      raise ValueError(f"length={length} is too long for {name}: its haystack runs out at {fa} tokens")
    fx = f(x)
    if fx > length:
      b, fb = x, fx
      break
    slope = max((fx - f(lo)) / (x - lo), 1e-3)
    a, fa = x, fx
    x = min(hi, a + max(1, math.ceil((length - fa) / slope * 1.02) + 1))
  bisect = False
  while b - a > 1:
    width = b - a
    if bisect or fb <= fa:
      x = (a + b) // 2
    else:
      x = min(b - 1, max(a + 1, a + int((length - fa) * (b - a) / (fb - fa))))
    if f(x) <= length:
      a, fa = x, f(x)
      if not bisect and a + 1 < b:
        # Interpolation on an almost linear count usually lands on the answer: check the next size at once.
        if f(a + 1) > length:
          b, fb = a + 1, f(a + 1)
        else:
          a, fa = a + 1, f(a + 1)
    else:
      b, fb = x, f(x)
    bisect = not bisect and (b - a) * 2 > width
  return a


@dataclasses.dataclass(frozen=True)
class Plan:
  """One sample's randomness, drawn: `render(n)` is its text with a haystack of n units, for lo <= n <= hi."""

  render: Callable[[int], Parts]
  lo: int
  hi: int
