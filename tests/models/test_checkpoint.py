"""Hugging Face checkpoints: tiny Llamas written by hand (an independent writer) and by save_checkpoint load into
params whose logits match a float64 numpy Llama written here from the architecture; every malformed checkpoint
raises ValueError naming what is wrong."""

import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import tokenizers

from akv_jax.models import (LlamaConfig, config_from_hf, config_to_hf, forward, init_params, inverse_frequencies,
                            load_checkpoint, load_tokenizer, save_checkpoint)
from akv_jax.models import checkpoint as ckpt
from akv_jax.testing import random_hf_llama

V, D, F, L, N, K = 61, 32, 48, 2, 4, 2
B, T = 2, 12
# rope_theta 1e4 with an original context of 128 puts H=8's four frequencies in all three Llama-3 bands:
# wavelengths 6.3 (kept, < 128/4), 63 (smoothed), 628 and 6283 (divided by factor, > 128/1).
ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}


def hf_config(*, tie=False, head_dim=None, **overrides) -> dict:
  """A config.json as transformers writes it, extra keys included."""
  d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": D,
       "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": N, "num_key_value_heads": K,
       "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": dict(ROPE),
       "max_position_embeddings": 64, "tie_word_embeddings": tie, "attention_bias": False,
       "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.45.0"}
  if head_dim is not None:
    d["head_dim"] = head_dim
  d.update(overrides)
  return d


def hf_weights(seed: int, *, tie=False, h=D // N) -> dict[str, np.ndarray]:
  """Random f32 weights under Hugging Face's names and [out, in] shapes (akv_jax.testing.random_hf_llama)."""
  return random_hf_llama(seed, vocab=V, hidden=D, ffn=F, layers=L, heads=N, kv_heads=K, head_dim=h, tie=tie)


# ---------------------------------------------------------------------------------------------- numpy reference


def ref_inv_freq(h: int, theta: float, rope: dict | None) -> np.ndarray:
  """Rotary frequencies, Llama-3 scaled per frequency as Meta's reference `apply_scaling` does."""
  freqs = [1.0 / theta ** (2 * j / h) for j in range(h // 2)]
  if rope is None:
    return np.array(freqs)
  factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
  old = rope["original_max_position_embeddings"]
  out = []
  for f in freqs:
    wavelen = 2 * math.pi / f
    if wavelen < old / hi:
      out.append(f)
    elif wavelen > old / lo:
      out.append(f / factor)
    else:
      s = (old / wavelen - lo) / (hi - lo)
      out.append((1 - s) * f / factor + s * f)
  return np.array(out)


def ref_logits(w: dict[str, np.ndarray], cfg: dict, tokens: np.ndarray) -> np.ndarray:
  """float64 logits [B, T, V] of a Llama from HF-named weights: every Linear is x @ weight.T."""
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  n, kv, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim") or D // N
  inv = ref_inv_freq(h, cfg["rope_theta"], cfg["rope_scaling"])
  b, t = tokens.shape

  def rms(x, g):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg["rms_norm_eps"]) * g

  def rope(x):                                       # x [B, T, heads, H]; HF's rotate_half convention
    ang = np.arange(t)[:, None] * inv[None, :]       # [T, H/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[None, :, None]
    sin = np.sin(np.concatenate([ang, ang], -1))[None, :, None]
    rotated = np.concatenate([-x[..., h // 2:], x[..., :h // 2]], -1)
    return x * cos + rotated * sin

  x = w["model.embed_tokens.weight"][tokens]         # [B, T, D]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    a = rms(x, w[p + "input_layernorm.weight"])
    q = rope((a @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, n, h))
    k = rope((a @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, kv, h))
    v = (a @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, kv, h)
    # GQA: query head j reads kv head j // (N / K), HF's repeat_kv.
    k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    s = np.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(h)
    s = np.where(causal, s, -np.inf)
    prob = np.exp(s - s.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    o = np.einsum("BNTS,BSNH->BTNH", prob, v).reshape(b, t, n * h)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    m = rms(x, w[p + "post_attention_layernorm.weight"])
    g = m @ w[p + "mlp.gate_proj.weight"].T
    x = x + ((g / (1 + np.exp(-g))) * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
  x = rms(x, w["model.norm.weight"])
  head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
  return x @ head.T


# ---------------------------------------------------------------------------------------------- writers


def write_hand(path, weights: dict, cfg: dict, *, sharded=False):
  """An independent writer: safetensors.numpy.save_file and a hand-written config.json (and index)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  if not sharded:
    safetensors.numpy.save_file(weights, path / "model.safetensors")
    return path
  first = {k for k in weights if k.startswith(("model.embed_tokens.", "model.layers.0."))}
  files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": set(weights) - first}
  for file, names in files.items():
    safetensors.numpy.save_file({k: weights[k] for k in names}, path / file)
  index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())},
           "weight_map": {k: file for file, names in files.items() for k in sorted(names)}}
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  return path


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(7), (B, T), 0, V, jnp.int32)


@pytest.fixture(scope="module")
def untied():
  return hf_weights(0), hf_config()


@pytest.fixture(scope="module")
def tied():
  # head_dim 16 != D / N: q_proj is [64, 32], so head_dim must come from config.json.
  return hf_weights(1, tie=True, h=16), hf_config(tie=True, head_dim=16)


VARIANTS = ["hand", "hand_bf16", "hand_sharded", "hand_tied", "saved", "saved_sharded", "saved_tied"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_numpy_reference(variant, untied, tied, tokens, tmp_path):
  weights, cfg = tied if variant.endswith("tied") else untied
  weights = dict(weights)
  if variant == "hand_bf16":
    weights = {k: v.astype(jnp.bfloat16) for k, v in weights.items()}
  if variant == "hand":
    # Older exports carry rotary tables; the loader skips them.
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = ref_inv_freq(8, 10000.0, None).astype(np.float32)
  path = write_hand(tmp_path / "hand", weights, cfg, sharded=variant == "hand_sharded")
  if variant.startswith("saved"):
    config, params = load_checkpoint(path)
    path = tmp_path / "saved"
    save_checkpoint(path, config, params, shards=3 if variant == "saved_sharded" else 1)
    assert (path / "model.safetensors.index.json").exists() == (variant == "saved_sharded")

  config, params = load_checkpoint(path)
  got = forward(config, params, tokens)
  want = ref_logits(weights, cfg, np.asarray(tokens))
  assert got.dtype == jnp.float32 and got.shape == (B, T, V)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_frequencies_cover_every_llama3_band_and_match():
  inv = ref_inv_freq(8, 10000.0, ROPE)
  plain = ref_inv_freq(8, 10000.0, None)
  ratio = inv / plain
  assert ratio[0] == 1 and 1 / 8 < ratio[1] < 1 and ratio[2] == ratio[3] == 1 / 8, ratio
  np.testing.assert_allclose(inverse_frequencies(config_from_hf(hf_config())), inv, rtol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_bfloat16_load_has_init_params_tree_and_close_logits(tie, untied, tied, tokens, tmp_path):
  weights, cfg = tied if tie else untied
  config, params = load_checkpoint(write_hand(tmp_path, weights, cfg), dtype="bfloat16", max_seq_len=32)
  assert config.dtype == "bfloat16" and config.max_seq_len == 32 and config.tie_embeddings == tie
  want = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(lambda x: (x.shape, x.dtype), want)
  got = np.asarray(forward(config, params, tokens), np.float64)
  ref = ref_logits(weights, cfg, np.asarray(tokens))
  # bf16 activations: a relative-norm bound, not elementwise.
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


@pytest.mark.parametrize("tie, shards", [(False, 1), (False, 2), (True, 5)])
def test_save_load_round_trip_is_exact(tie, shards, tmp_path):
  config = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=N,
                       num_kv_heads=K, rope_scaling=config_from_hf(hf_config()).rope_scaling, tie_embeddings=tie,
                       max_seq_len=96)
  params = init_params(config, jax.random.key(3))
  save_checkpoint(tmp_path, config, params, shards=shards)
  if shards > 1:
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-{i:05d}-of-{shards:05d}.safetensors"
                                                          for i in range(1, shards + 1)]
  loaded_config, loaded = load_checkpoint(tmp_path)
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert config_from_hf(config_to_hf(config), max_seq_len=config.max_seq_len) == config


def test_tied_checkpoint_may_store_lm_head(tied, tmp_path):
  weights, cfg = tied
  stored = dict(weights, **{"lm_head.weight": weights["model.embed_tokens.weight"]})
  _, want = load_checkpoint(write_hand(tmp_path / "a", weights, cfg))
  _, got = load_checkpoint(write_hand(tmp_path / "b", stored, cfg))
  assert "lm_head" not in got
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bf16_raw_reader_matches_safetensors(tmp_path):
  x = np.asarray(jax.random.normal(jax.random.key(4), (3, 5))).astype(jnp.bfloat16)
  safetensors.numpy.save_file({"a": np.ones(2, np.float32), "b": x}, tmp_path / "w.safetensors")
  got = ckpt._read_bf16(tmp_path / "w.safetensors", "b")  # pylint: disable=protected-access
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, x.astype(np.float32))
  with pytest.raises(ValueError, match=r"tensor 'a' in w.safetensors is F32, not BF16"):
    ckpt._read_bf16(tmp_path / "w.safetensors", "a")  # pylint: disable=protected-access


@pytest.mark.parametrize("overrides, check", [
    (dict(rope_scaling={"type": "llama3", **{k: v for k, v in ROPE.items() if k != "rope_type"}}),
     lambda c: c.rope_scaling.factor == 8.0),
    (dict(rope_scaling={"rope_type": "default"}), lambda c: c.rope_scaling is None),
    (dict(rope_scaling=None), lambda c: c.rope_scaling is None),
    (dict(rope_scaling=None, rope_theta=None, rope_parameters={"rope_theta": 5e5, **ROPE}),
     lambda c: c.rope_theta == 5e5 and c.rope_scaling.original_max_position_embeddings == 128),
    (dict(architectures=None), lambda c: c.num_layers == L),
    (dict(head_dim=D // N), lambda c: c.head_dim is None and c.hd == 8),
    (dict(head_dim=16), lambda c: c.head_dim == 16),
    (dict(num_key_value_heads=None), lambda c: c.num_kv_heads == N),
])
def test_config_from_hf(overrides, check):
  d = hf_config(**overrides)
  for key in [k for k, v in overrides.items() if v is None and k != "rope_scaling"]:
    del d[key]
  assert check(config_from_hf(d))


def test_config_from_hf_defaults_are_transformers():
  d = {k: hf_config()[k] for k in ("architectures", "vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads")}
  c = config_from_hf(d)
  assert (c.rope_theta, c.rms_norm_eps, c.max_seq_len, c.tie_embeddings, c.num_kv_heads, c.rope_scaling) == (
      10000.0, 1e-6, 2048, False, N, None)
  assert config_from_hf(d, max_seq_len=100).max_seq_len == 100


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, match", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral"), r"\['MistralForCausalLM'\].*'mistral'"),
    (dict(architectures=[], model_type="gemma"), "model_type='gemma'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "config.json has no 'low_freq_factor'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(vocab_size=None), "config.json has no 'vocab_size'"),
])
def test_config_from_hf_errors(overrides, match):
  d = hf_config(**overrides)
  if overrides.get("vocab_size", 0) is None:
    del d["vocab_size"]
  with pytest.raises(ValueError, match=match):
    config_from_hf(d)


def test_config_from_hf_bad_dtype():
  with pytest.raises(ValueError, match="dtype='float16'"):
    config_from_hf(hf_config(), dtype="float16")


UP1 = "model.layers.1.mlp.up_proj.weight"


def _edit(weights, *, drop=()):
  return {k: v for k, v in weights.items() if k not in drop}


def test_missing_tensor_names_key_and_file(untied, tmp_path):
  weights, cfg = untied
  with pytest.raises(ValueError, match=re.escape(f"['{UP1}'] are missing; searched ['model.safetensors']")):
    load_checkpoint(write_hand(tmp_path, _edit(weights, drop=[UP1]), cfg))


def test_missing_tensor_in_shards_names_every_shard(untied, tmp_path):
  weights, cfg = untied
  path = write_hand(tmp_path, _edit(weights, drop=[UP1, "lm_head.weight"]), cfg, sharded=True)
  with pytest.raises(ValueError, match=re.escape(
      f"['{UP1}', 'lm_head.weight'] are missing; searched ['model-00001-of-00002.safetensors', "
      "'model-00002-of-00002.safetensors']")):
    load_checkpoint(path)


def test_shape_mismatch_names_key_file_and_shapes(untied, tmp_path):
  weights, cfg = untied
  path = write_hand(tmp_path, dict(weights, **{UP1: weights[UP1][:, :-1]}), cfg, sharded=True)
  with pytest.raises(ValueError, match=re.escape(
      f"'{UP1}' in model-00002-of-00002.safetensors has shape (48, 31), expected (48, 32)")):
    load_checkpoint(path)


def test_unexpected_tensor_is_named(untied, tmp_path):
  weights, cfg = untied
  extra = {"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32),
           "model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)}
  with pytest.raises(ValueError, match=re.escape(
      "unexpected tensors ['model.layers.0.self_attn.q_norm.weight', 'model.layers.0.self_attn.q_proj.bias']")):
    load_checkpoint(write_hand(tmp_path, dict(weights, **extra), cfg))


def test_untied_checkpoint_needs_lm_head(untied, tmp_path):
  weights, cfg = untied
  with pytest.raises(ValueError, match=r"\['lm_head.weight'\] are missing"):
    load_checkpoint(write_hand(tmp_path, _edit(weights, drop=["lm_head.weight"]), cfg))


def test_integer_tensor_is_refused(untied, tmp_path):
  weights, cfg = untied
  path = write_hand(tmp_path, dict(weights, **{UP1: weights[UP1].astype(np.int32)}), cfg)
  with pytest.raises(ValueError, match=re.escape(f"'{UP1}' in model.safetensors has dtype I32")):
    load_checkpoint(path)


def test_directory_errors(untied, tmp_path):
  weights, cfg = untied
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'none'} has no config.json")):
    load_checkpoint(tmp_path / "none")
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json is not valid JSON"):
    load_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="has neither model.safetensors nor model.safetensors.index.json"):
    load_checkpoint(tmp_path)


def test_index_errors(untied, tmp_path):
  weights, cfg = untied
  path = write_hand(tmp_path, weights, cfg, sharded=True)
  safetensors.numpy.save_file(weights, path / "model.safetensors")
  with pytest.raises(ValueError, match="has both model.safetensors and model.safetensors.index.json"):
    load_checkpoint(path)
  (path / "model.safetensors").unlink()
  # A tensor stored in both shards.
  safetensors.numpy.save_file({"model.norm.weight": weights["model.norm.weight"], **{
      k: v for k, v in weights.items() if k.startswith("model.layers.0.")}}, path / "model-00001-of-00002.safetensors")
  with pytest.raises(ValueError, match="tensor 'model.norm.weight' is in both model-00001-of-00002.safetensors "
                                       "and model-00002-of-00002.safetensors"):
    load_checkpoint(path)
  (path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(ValueError, match="maps tensors to model-00002-of-00002.safetensors, which is missing"):
    load_checkpoint(path)
  (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
  with pytest.raises(ValueError, match="model.safetensors.index.json has no weight_map"):
    load_checkpoint(path)


def test_save_checkpoint_errors(tmp_path):
  config = config_from_hf(hf_config())
  params = init_params(config, jax.random.key(0))
  with pytest.raises(ValueError, match=re.escape("shards=0 must be in [1, 21]")):
    save_checkpoint(tmp_path, config, params, shards=0)
  missing = {**params, "layers_1": {k: v for k, v in params["layers_1"].items() if k != "up_proj"}}
  with pytest.raises(ValueError, match="params has no layers_1/up_proj/kernel"):
    save_checkpoint(tmp_path, config, missing)
  wrong = {**params, "norm": {"weight": jnp.ones(D + 1)}}
  with pytest.raises(ValueError, match=re.escape("params norm/weight has shape (33,), expected (32,)")):
    save_checkpoint(tmp_path, config, wrong)
  tied = config_from_hf(hf_config(tie_word_embeddings=True))
  with pytest.raises(ValueError, match=re.escape("params has leaves ['lm_head/kernel']")):
    save_checkpoint(tmp_path, tied, params)
  assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(untied, tmp_path):
  weights, cfg = untied
  path = write_hand(tmp_path, weights, cfg)
  vocab = {"[UNK]": 0, "the": 1, "cache": 2, "is": 3, "compressed": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(path / "tokenizer.json"))
  loaded = load_tokenizer(path)
  ids = loaded.encode("the cache is compressed").ids
  assert ids == [1, 2, 3, 4]
  assert loaded.decode(ids) == "the cache is compressed"
  assert loaded.encode("the model").ids == [1, 0]
  assert load_tokenizer(path / "tokenizer.json").get_vocab() == vocab


def test_missing_tokenizer_names_path(tmp_path):
  with pytest.raises(ValueError, match=re.escape(f"no tokenizer.json at {tmp_path / 'tokenizer.json'}")):
    load_tokenizer(tmp_path)
