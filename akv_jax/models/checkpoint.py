"""Hugging Face Llama checkpoints (config.json + safetensors) to and from this package's config and params.

A checkpoint directory holds config.json and either model.safetensors or model.safetensors.index.json with the
shards it names; tokenizer.json may sit beside them. Hugging Face stores a linear layer's `weight` as [out, in]
while Flax's Dense `kernel` is [in, out], so every projection is transposed on the way in and on the way out.

Typical use:

    config, params = load_checkpoint("Llama-3.2-1B", dtype="bfloat16", max_seq_len=4096)
    tokenizer = load_tokenizer("Llama-3.2-1B")
    logits = forward(config, params, tokens)          # tokens: i32[B, T] -> f32[B, T, V]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
import tokenizers

from akv_jax.models.config import LlamaConfig, RopeScaling

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"

# Older exports save each layer's rotary table; it is recomputed from the config, so it is skipped, not an error.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# safetensors dtype codes that cast losslessly enough to f32/bf16; integer or fp8 tensors (quantized
# checkpoints, which carry scales this loader does not apply) are refused rather than cast to garbage.
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One tensor: its Hugging Face name and [out, in] shape, and where it sits in the Flax params tree."""

  name: str
  shape: tuple[int, ...]
  path: tuple[str, ...]
  transpose: bool          # an HF [out, in] weight that is a Flax [in, out] kernel
  is_norm: bool = False


def _layout(config: LlamaConfig) -> list[_Entry]:
  """Every tensor a checkpoint of `config` must hold, in Hugging Face's order."""
  v, d, f = config.vocab_size, config.hidden_size, config.intermediate_size
  nh, kh = config.num_heads * config.hd, config.num_kv_heads * config.hd
  out = [_Entry("model.embed_tokens.weight", (v, d), ("embed_tokens", "embedding"), transpose=False)]
  for i in range(config.num_layers):
    hf, fl = f"model.layers.{i}", f"layers_{i}"
    out += [
        _Entry(f"{hf}.input_layernorm.weight", (d,), (fl, "input_layernorm", "weight"), False, is_norm=True),
        _Entry(f"{hf}.self_attn.q_proj.weight", (nh, d), (fl, "q_proj", "kernel"), True),
        _Entry(f"{hf}.self_attn.k_proj.weight", (kh, d), (fl, "k_proj", "kernel"), True),
        _Entry(f"{hf}.self_attn.v_proj.weight", (kh, d), (fl, "v_proj", "kernel"), True),
        _Entry(f"{hf}.self_attn.o_proj.weight", (d, nh), (fl, "o_proj", "kernel"), True),
        _Entry(f"{hf}.post_attention_layernorm.weight", (d,), (fl, "post_attention_layernorm", "weight"), False,
               is_norm=True),
        _Entry(f"{hf}.mlp.gate_proj.weight", (f, d), (fl, "gate_proj", "kernel"), True),
        _Entry(f"{hf}.mlp.up_proj.weight", (f, d), (fl, "up_proj", "kernel"), True),
        _Entry(f"{hf}.mlp.down_proj.weight", (d, f), (fl, "down_proj", "kernel"), True),
    ]
  out.append(_Entry("model.norm.weight", (d,), ("norm", "weight"), False, is_norm=True))
  if not config.tie_embeddings:
    out.append(_Entry("lm_head.weight", (v, d), ("lm_head", "kernel"), True))
  return out


# ---------------------------------------------------------------------------------------------- config.json


def _require(d: Mapping, key: str):
  if key not in d:
    raise ValueError(f"config.json has no {key!r}")
  return d[key]


def _rope_scaling(rope: Mapping | None) -> RopeScaling | None:
  if rope is None:
    return None
  # transformers wrote "type" before it wrote "rope_type"; both are still found in published checkpoints.
  kind = rope.get("rope_type", rope.get("type"))
  if kind in (None, "default"):
    return None
  if kind != "llama3":
    raise ValueError(f"rope type {kind!r} is not supported; expected 'default' or 'llama3'")
  return RopeScaling(factor=float(_require(rope, "factor")),
                     low_freq_factor=float(_require(rope, "low_freq_factor")),
                     high_freq_factor=float(_require(rope, "high_freq_factor")),
                     original_max_position_embeddings=int(_require(rope, "original_max_position_embeddings")))


def config_from_hf(d: Mapping, *, max_seq_len: int | None = None, dtype: str = "float32") -> LlamaConfig:
  """A LlamaConfig from a Hugging Face config.json dict.

  Keys absent from `d` take transformers' LlamaConfig defaults (rope_theta 10000, rms_norm_eps 1e-6,
  max_position_embeddings 2048, untied embeddings), not this package's, since those are what the checkpoint's
  author trained with.

  Args:
    d: the parsed config.json; architectures must include LlamaForCausalLM (or, without architectures,
      model_type must be "llama").
    max_seq_len: the longest sequence a cache is built for; default max_position_embeddings.
    dtype: "float32" or "bfloat16", the activation and parameter dtype.
  """
  archs = d.get("architectures") or []
  model_type = d.get("model_type")
  if not ("LlamaForCausalLM" in archs if archs else model_type == "llama"):
    raise ValueError(f"architectures={archs} (model_type={model_type!r}) is not a Llama causal LM; "
                     "expected 'LlamaForCausalLM'")
  if d.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported; the Llama MLP here is SwiGLU ('silu')")
  for bias in ("attention_bias", "mlp_bias"):
    if d.get(bias, False):
      raise ValueError(f"{bias}={d[bias]} is not supported; these projections have no bias")
  # transformers v5 folds rope_theta and the scaling into one "rope_parameters" dict.
  rope = d.get("rope_scaling")
  rope_params = d.get("rope_parameters") or {}
  if rope is None and rope_params:
    rope = rope_params
  rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))

  hidden, heads = int(_require(d, "hidden_size")), int(_require(d, "num_attention_heads"))
  head_dim = d.get("head_dim")
  # None when it is the default D / N, so a config survives a save and load unchanged (and hashes the same).
  if head_dim is not None and int(head_dim) * heads == hidden:
    head_dim = None
  return LlamaConfig(
      vocab_size=int(_require(d, "vocab_size")),
      hidden_size=hidden,
      intermediate_size=int(_require(d, "intermediate_size")),
      num_layers=int(_require(d, "num_hidden_layers")),
      num_heads=heads,
      num_kv_heads=int(d.get("num_key_value_heads") or heads),
      head_dim=None if head_dim is None else int(head_dim),
      rope_theta=float(rope_theta),
      rope_scaling=_rope_scaling(rope),
      rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(d.get("tie_word_embeddings", False)),
      max_seq_len=int(max_seq_len if max_seq_len is not None else d.get("max_position_embeddings", 2048)),
      dtype=dtype,
  )


def config_to_hf(config: LlamaConfig) -> dict:
  """The Hugging Face config.json dict (LlamaForCausalLM, float32 weights) of a LlamaConfig."""
  sc = config.rope_scaling
  rope = None if sc is None else {
      "rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
      "high_freq_factor": sc.high_freq_factor, "original_max_position_embeddings": sc.original_max_position_embeddings}
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.hd,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "rope_theta": config.rope_theta,
      "rope_scaling": rope,
      "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_embeddings,
      "max_position_embeddings": config.max_seq_len,
      "torch_dtype": "float32",
  }


def _read_json(file: pathlib.Path) -> dict:
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from None


# ---------------------------------------------------------------------------------------------- loading


def _weight_files(root: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint directory: the one model.safetensors or the shards its index names."""
  single, index = root / WEIGHTS_NAME, root / INDEX_NAME
  if single.exists() and index.exists():
    raise ValueError(f"{root} has both {WEIGHTS_NAME} and {INDEX_NAME}; remove the stale one")
  if single.exists():
    return [single]
  if not index.exists():
    raise ValueError(f"{root} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
  weight_map = _read_json(index).get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index} has no weight_map")
  files = [root / name for name in sorted(set(weight_map.values()))]
  for file in files:
    if not file.exists():
      raise ValueError(f"{index} maps tensors to {file.name}, which is missing from {root}")
  return files


def _inventory(files: list[pathlib.Path]) -> dict[str, pathlib.Path]:
  """Tensor name -> the file holding it, from the files' headers (no tensor data is read)."""
  where: dict[str, pathlib.Path] = {}
  for file in files:
    with safetensors.safe_open(file, framework="np") as f:
      for name in f.keys():
        if name in where:
          raise ValueError(f"tensor {name!r} is in both {where[name].name} and {file.name}")
        where[name] = file
  return where


def _read_bf16(file: pathlib.Path, name: str) -> np.ndarray:
  """f32 copy of a BF16 tensor read straight from the file: 8-byte little-endian header size, JSON header, data.

  A bf16 value is the top half of an f32, so shifting its 16 bits up is exact.
  """
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    info = json.loads(f.read(n))[name]
  if info["dtype"] != "BF16":
    raise ValueError(f"tensor {name!r} in {file.name} is {info['dtype']}, not BF16")
  begin, end = info["data_offsets"]
  raw = np.fromfile(file, dtype="<u2", count=(end - begin) // 2, offset=8 + n + begin)
  return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _listed(names: list[str], k: int = 8) -> str:
  """The first k names, and how many more: a wrong-architecture checkpoint would otherwise print hundreds."""
  return f"{names[:k]}" + (f" and {len(names) - k} more" if len(names) > k else "")


def load_checkpoint(path: str | os.PathLike, *, dtype: str = "float32",
                    max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
  """Loads a Hugging Face Llama checkpoint directory.

  Every tensor the config implies must be present with its exact shape; tensors the model has no place for are
  an error (so a checkpoint of another architecture cannot load half-way), except rotary inv_freq buffers and,
  with tied embeddings, a stored lm_head.weight.

  Args:
    path: a directory with config.json and model.safetensors, or model.safetensors.index.json and its shards.
    dtype: "float32" or "bfloat16": the config's dtype, and the dtype of the embedding and projection params
      (whatever the stored dtype, bf16 included). Norm weights stay f32, as init_params makes them.
    max_seq_len: overrides config.json's max_position_embeddings.

  Returns:
    (config, params): params is the tree init_params(config, key) would make: kernels [in, out], embedding
    [V, D], norm weights f32[D].
  """
  root = pathlib.Path(path)
  if not (root / CONFIG_NAME).is_file():
    raise ValueError(f"{root} has no {CONFIG_NAME}")
  config = config_from_hf(_read_json(root / CONFIG_NAME), max_seq_len=max_seq_len, dtype=dtype)
  files = _weight_files(root)
  where = _inventory(files)
  layout = _layout(config)

  expected = {e.name for e in layout}
  extra = sorted(n for n in where if n not in expected and not _IGNORED.search(n)
                 and not (config.tie_embeddings and n == "lm_head.weight"))
  if extra:
    raise ValueError(f"unexpected tensors {_listed(extra)} in {root}: a Llama with this config has no place for them")
  missing = [e.name for e in layout if e.name not in where]
  if missing:
    raise ValueError(f"tensors {_listed(missing)} are missing; searched {[f.name for f in files]} in {root}")

  param_dtype = jnp.dtype(dtype)
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safetensors.safe_open(f, framework="np")) for f in files}
    for e in layout:
      file = where[e.name]
      view = handles[file].get_slice(e.name)
      shape, code = tuple(view.get_shape()), view.get_dtype()
      if shape != e.shape:
        raise ValueError(f"tensor {e.name!r} in {file.name} has shape {shape}, expected {e.shape}")
      if code not in _FLOAT_CODES:
        raise ValueError(f"tensor {e.name!r} in {file.name} has dtype {code}, expected one of {_FLOAT_CODES}")
      try:
        # safetensors >= 0.6 or so returns BF16 as an ml_dtypes bfloat16 array, which casts like any float.
        arr = handles[file].get_tensor(e.name)
      except Exception:  # pylint: disable=broad-except
        # Older ones have no numpy bfloat16 (the error type varies by version): read the bytes ourselves.
        if code != "BF16":
          raise
        arr = _read_bf16(file, e.name)
      arr = arr.T if e.transpose else arr
      node = params
      for key in e.path[:-1]:
        node = node.setdefault(key, {})
      node[e.path[-1]] = jnp.asarray(arr, jnp.float32 if e.is_norm else param_dtype)
  return config, params


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """The tokenizers.Tokenizer of a checkpoint directory's tokenizer.json (or of a tokenizer.json path)."""
  p = pathlib.Path(path)
  file = p if p.is_file() else p / TOKENIZER_NAME
  if not file.is_file():
    raise ValueError(f"no {TOKENIZER_NAME} at {file}")
  return tokenizers.Tokenizer.from_file(str(file))


# ---------------------------------------------------------------------------------------------- saving


def _leaves(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_leaves(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _shard_groups(names: list[str], sizes: list[int], shards: int) -> list[list[str]]:
  """Consecutive groups of about equal bytes, none empty (HF keeps a layer's tensors together the same way)."""
  total, groups, before = sum(sizes), [[]], 0
  for i, (name, size) in enumerate(zip(names, sizes)):
    left, to_open = len(names) - i, shards - len(groups)
    if groups[-1] and to_open and (before >= total * len(groups) / shards or left <= to_open):
      groups.append([])
    groups[-1].append(name)
    before += size
  return groups


def save_checkpoint(path: str | os.PathLike, config: LlamaConfig, params, *, shards: int = 1) -> None:
  """Writes a Hugging Face checkpoint: config.json and float32 safetensors, loadable by transformers too.

  Args:
    path: a directory, created if absent; files of the same names are overwritten.
    config: the model's config; max_seq_len is written as max_position_embeddings.
    params: the tree of init_params(config, key) (or load_checkpoint), any float dtype.
    shards: 1 writes model.safetensors; n > 1 writes model-0000i-of-0000n.safetensors and
      model.safetensors.index.json.
  """
  layout = _layout(config)
  if not 1 <= shards <= len(layout):
    raise ValueError(f"shards={shards} must be in [1, {len(layout)}] (the number of tensors)")
  leaves = _leaves(params)
  unknown = sorted("/".join(p) for p in set(leaves) - {e.path for e in layout})
  if unknown:
    raise ValueError(f"params has leaves {unknown} that a Llama with this config does not have")
  tensors = {}
  for e in layout:
    if e.path not in leaves:
      raise ValueError(f"params has no {'/'.join(e.path)} (the checkpoint's {e.name})")
    arr = np.asarray(leaves[e.path]).astype(np.float32)
    want = e.shape[::-1] if e.transpose else e.shape
    if arr.shape != want:
      raise ValueError(f"params {'/'.join(e.path)} has shape {arr.shape}, expected {want} for this config")
    arr = arr.T if e.transpose else arr
    tensors[e.name] = np.ascontiguousarray(arr)

  root = pathlib.Path(path)
  root.mkdir(parents=True, exist_ok=True)
  (root / CONFIG_NAME).write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
  # transformers refuses safetensors whose metadata lacks a known "format".
  metadata = {"format": "pt"}
  if shards == 1:
    safetensors.numpy.save_file(tensors, root / WEIGHTS_NAME, metadata=metadata)
    return
  names = list(tensors)
  groups = _shard_groups(names, [tensors[n].nbytes for n in names], shards)
  weight_map = {}
  for i, group in enumerate(groups):
    file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in group}, root / file, metadata=metadata)
    weight_map.update({n: file for n in group})
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
  (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
