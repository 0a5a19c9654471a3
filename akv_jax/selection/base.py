"""The scorer interface: what a token-selection method is, what it reads, and the registry of methods by name.

A scorer is a frozen, hashable dataclass (a static argument of every jitted function) that owns its knobs and
validates them in `__post_init__`. It says what it needs to see (`needs`), and `score` turns one layer's prefill
cache and those observations into f32[B, K, S] scores, higher = keep, -inf at padding. The pipeline keeps the
top-scoring tokens under the policy's budget; it never asks which method it holds.

Adding a method: one module with a `@register` dataclass subclassing `Scorer`, plus its import in
`akv_jax/selection/__init__.py` (see CONTRIBUTING.md).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import jax

from akv_jax import validation
from akv_jax.cache import DenseKV

VoteKind = Literal["window", "all", "reconstruction"]


@dataclasses.dataclass(frozen=True)
class Reconstruct:
  """How the model runs a context-reconstruction pass for a scorer (KVzip): `chunk` context tokens per pass, and
  the first `sinks` tokens inside each reconstruction query's softmax."""

  chunk: int
  sinks: int


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a scorer reads besides the cache.

  Attributes:
    queries: trailing post-RoPE prompt queries per row it reads (0: none). The model passes at most the prompt
      capacity S, so a scorer that wants every prompt query asks for S (`all_queries`).
    votes: which attention votes of the prefill kernel can stand in for the queries: "window" (probabilities
      summed over the last `queries` queries), "all" (over every prompt query), or None (it needs the queries);
      "reconstruction": votes only a second pass of the model gives (`reconstruction`), nothing stands in.
    rope: whether it needs the model's rotary inverse frequencies (`Observations.inv_freq`).
    reconstruction: the context-reconstruction pass the model runs for the votes (KVzip), or None.
  """

  queries: int = 0
  votes: VoteKind | None = None
  rope: bool = False
  reconstruction: Reconstruct | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Observations:
  """What the model saw during prefill, for one layer.

  Attributes:
    queries: [B, N, T, H] the last T post-RoPE prompt queries of each row (row b's query t sits at position
      lengths[b] - T + t), or None.
    votes: f32[B, K, S] attention votes from the prefill kernel or the reconstruction pass (see `Needs.votes`),
      or None.
    inv_freq: f32[H / 2] rotary inverse frequencies of the model (half-split rotary convention), or None.
  """

  queries: jax.Array | None = None
  votes: jax.Array | None = None
  inv_freq: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Scorer:
  """Base class of token scorers. Subclasses are frozen dataclasses registered with `@register`.

  Class attributes:
    name: the registry name, used in reports and by `Policy(selection=name)`.
    recency_only: the method keeps the most recent tokens and scores nothing: its whole budget is the bf16
      recent window (StreamingLLM).
    decode_rule: the decode rule a policy gets when it names none (akv_jax.decode_rules.DECODE_RULES).
  """

  name: ClassVar[str] = ""
  recency_only: ClassVar[bool] = False
  decode_rule: ClassVar[str] = "kivi_residual"

  def needs(self, s: int) -> Needs:
    """What `score` reads for a prompt capacity of S tokens."""
    del s
    return Needs()

  def check(self, *, recent: int) -> None:
    """Raises ValueError when the policy's guard bands cannot hold what this scorer needs (default: nothing)."""
    del recent

  def check_length(self, s: int) -> None:
    """Raises ValueError when a cache of S tokens is too short for this scorer (default: any S works)."""
    del s

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    """f32[B, K, S] scores of kv [B, K, S, H] (higher = keep, -inf at padding)."""
    raise NotImplementedError(f"scorer {type(self).__name__} does not define score")

  def check_observations(self, obs: Observations, b: int, kh: int, h: int, s: int) -> None:
    """Trace-time checks that `obs` holds what `needs(s)` asks for, in shapes that fit the cache."""
    needs = self.needs(s)
    if obs.votes is not None:
      if needs.votes is None:
        raise ValueError(f"votes are read only by scorers that take the prefill kernel's votes (Needs.votes), "
                         f"not selection={self.name!r}")
      if obs.queries is not None:
        raise ValueError("pass queries or votes, not both: the votes already summarize the queries")
    elif needs.reconstruction is not None:
      raise ValueError(f"selection={self.name!r} scores from a context-reconstruction pass of the model: pass its "
                       "votes=[B, K, S], as akv_jax.models.prefill / prefill_many do when given reconstruction="
                       "models.Reconstruction(...)")
    elif needs.queries:
      if obs.queries is None:
        raise ValueError(f"selection={self.name!r} needs observation queries; pass queries=[B, N, T, H]"
                         + (" or votes=[B, K, S]" if needs.votes else ""))
      validation.queries(obs.queries, b, kh, h)
    if needs.rope:
      if obs.inv_freq is None:
        raise ValueError(f"selection={self.name!r} needs the model's rotary frequencies; pass inv_freq=[H / 2] "
                         "(akv_jax.models.inverse_frequencies(config))")
      if obs.inv_freq.shape != (h // 2,):
        raise ValueError(f"inv_freq must be [H / 2] = {(h // 2,)}, got shape {obs.inv_freq.shape}")


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
  """Class decorator: adds a Scorer subclass to the registry under `cls.name`."""
  if not (isinstance(cls, type) and issubclass(cls, Scorer)):
    raise ValueError(f"register expects a Scorer subclass, got {cls!r}")
  if not cls.name:
    raise ValueError(f"scorer {cls.__name__} has no name")
  if cls.name in SCORERS and SCORERS[cls.name] is not cls:
    raise ValueError(f"a scorer named {cls.name!r} is already registered ({SCORERS[cls.name].__name__})")
  SCORERS[cls.name] = cls
  return cls


def scorer(name: str, **knobs) -> Scorer:
  """The registered scorer `name` with the given knobs (e.g. scorer("snapkv", window=16))."""
  if name not in SCORERS:
    raise ValueError(f"selection={name!r} is unknown; use one of {('none', *SCORERS)}")
  return SCORERS[name](**knobs)
