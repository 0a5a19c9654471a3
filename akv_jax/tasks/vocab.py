"""The synthetic vocabulary every task draws from: a few specials, one marker per task, then keys, values, words.

Id layout (defaults in brackets; 398 ids in all):

  0 PAD  1 BOS  2 EOS  3 SEP  4 QUERY  5 KEY  6 VAR   fixed specials
  7 ...                        one marker per task name, in `tasks` order   [7]
  then num_keys key ids        "k0", "k1", ...  needle keys and variable names  [64]
  then num_values value ids    "v0", "v1", ...  needle values and chain values  [64]
  then num_words word ids      "w0", "w1", ...  haystack filler and word lists  [256]

The groups are disjoint, so a prompt parses without lookahead: a value run ends at the first id that is not a
value, which is why needles need no terminator.

Records put the id a query asks for right before the id it retrieves ("KEY k v", "VAR src dst"), and a prompt
ends with the queried id, the answer following it: every retrieval step is then "find my id earlier, copy the id
after it", the copy an induction head makes. The shipped model learned that lookup in this format
(experiments/toy/probe_lookup.py measures it); experiments/toy/probe_format.py compares it with the marker formats
(`KEY k VALUE v`, `QUERY k ANSWER v`) this one replaced.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Iterable

import numpy as np

PAD, BOS, EOS, SEP, QUERY, KEY, VAR = range(7)
_SPECIAL_NAMES = ("<pad>", "<bos>", "<eos>", "SEP", "QUERY", "KEY", "VAR")
NUM_SPECIALS = len(_SPECIAL_NAMES)

# One marker id per task; ruler.TASKS must register exactly these names (tests/models/test_tasks.py checks).
TASK_NAMES = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
              "common_words", "frequent_words")

_TOKEN = re.compile(r"([kvw])(\d+)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Vocab:
  """Sizes of the synthetic vocabulary; ids are laid out as the module docstring shows.

  Attributes:
    num_keys: key ids ("k<i>"), used for needle keys and variable names.
    num_values: value ids ("v<i>"), used for needle values and the values variables are bound to.
    num_words: word ids ("w<i>"), used for haystack filler and the word-frequency tasks.
    tasks: task names, one marker id each.
  """

  PAD: ClassVar[int] = PAD
  BOS: ClassVar[int] = BOS
  EOS: ClassVar[int] = EOS
  SEP: ClassVar[int] = SEP
  QUERY: ClassVar[int] = QUERY
  KEY: ClassVar[int] = KEY
  VAR: ClassVar[int] = VAR

  num_keys: int = 64
  num_values: int = 64
  num_words: int = 256
  tasks: tuple[str, ...] = TASK_NAMES

  def __post_init__(self):
    for field in ("num_keys", "num_values", "num_words"):
      n = getattr(self, field)
      if not isinstance(n, int) or n < 1:
        raise ValueError(f"{field}={n!r} must be an int >= 1")
    if not isinstance(self.tasks, tuple) or not self.tasks:
      raise ValueError(f"tasks={self.tasks!r} must be a non-empty tuple of names")
    if len(set(self.tasks)) != len(self.tasks):
      raise ValueError(f"tasks={self.tasks!r} has repeated names")

  @property
  def key_ids(self) -> range:
    start = NUM_SPECIALS + len(self.tasks)
    return range(start, start + self.num_keys)

  @property
  def value_ids(self) -> range:
    start = self.key_ids.stop
    return range(start, start + self.num_values)

  @property
  def word_ids(self) -> range:
    start = self.value_ids.stop
    return range(start, start + self.num_words)

  @property
  def size(self) -> int:
    """Number of ids; every id a task emits is in [0, size)."""
    return self.word_ids.stop

  def task_id(self, name: str) -> int:
    """The marker id of task `name`."""
    try:
      return NUM_SPECIALS + self.tasks.index(name)
    except ValueError:
      raise ValueError(f"task {name!r} has no marker in this vocab; its tasks are {self.tasks}") from None

  def name(self, i: int) -> str:
    """Readable name of one id: "<bos>", "KEY", "<niah_single>", "k17", "v3", "w88"; "<unk:N>" out of range."""
    i = int(i)
    if 0 <= i < NUM_SPECIALS:
      return _SPECIAL_NAMES[i]
    if NUM_SPECIALS <= i < self.key_ids.start:
      return f"<{self.tasks[i - NUM_SPECIALS]}>"
    for prefix, ids in (("k", self.key_ids), ("v", self.value_ids), ("w", self.word_ids)):
      if i in ids:
        return f"{prefix}{i - ids.start}"
    # Debug output must not fail on a model's out-of-vocabulary sample (an embedding table padded past size).
    return f"<unk:{i}>"

  def decode(self, ids: Iterable[int]) -> list[str]:
    """Readable names of ids: [T] -> T strings."""
    return [self.name(i) for i in np.asarray(ids).reshape(-1)]

  def describe(self, ids: Iterable[int]) -> str:
    """Ids as one space-separated string, e.g. "<bos> <niah_single> w5 KEY k3 v1 v7 QUERY k3"."""
    return " ".join(self.decode(ids))

  def encode(self, text: str) -> np.ndarray:
    """Inverse of `describe` for in-vocabulary names: a space-separated string -> i32[T]."""
    lookup = {name: i for i, name in enumerate(_SPECIAL_NAMES)}
    lookup.update({f"<{t}>": NUM_SPECIALS + j for j, t in enumerate(self.tasks)})
    out = []
    for tok in text.split():
      if tok in lookup:
        out.append(lookup[tok])
        continue
      m = _TOKEN.fullmatch(tok)
      ids = {"k": self.key_ids, "v": self.value_ids, "w": self.word_ids}[m.group(1)] if m else None
      if ids is None or int(m.group(2)) >= len(ids):
        raise ValueError(f"token {tok!r} is not in this vocab")
      out.append(ids[int(m.group(2))])
    return np.asarray(out, np.int32)
