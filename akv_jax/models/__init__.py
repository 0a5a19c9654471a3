"""Llama-family decoders that run on compressed KV caches (see llama.py), and checkpoint loading."""

from akv_jax.models.config import LlamaConfig as LlamaConfig
from akv_jax.models.config import RopeScaling as RopeScaling
from akv_jax.models.config import apply_rope as apply_rope
from akv_jax.models.config import inverse_frequencies as inverse_frequencies
from akv_jax.models.llama import Llama as Llama
from akv_jax.models.llama import decode_step as decode_step
from akv_jax.models.llama import forward as forward
from akv_jax.models.llama import generate as generate
from akv_jax.models.llama import init_params as init_params
from akv_jax.models.llama import prefill as prefill
from akv_jax.models.sharding import shard_batch as shard_batch
from akv_jax.models.sharding import shard_cache as shard_cache
from akv_jax.models.sharding import shard_params as shard_params
from akv_jax.models.checkpoint import config_from_hf as config_from_hf
from akv_jax.models.checkpoint import config_to_hf as config_to_hf
from akv_jax.models.checkpoint import load_checkpoint as load_checkpoint
from akv_jax.models.checkpoint import load_tokenizer as load_tokenizer
from akv_jax.models.checkpoint import save_checkpoint as save_checkpoint
from akv_jax.models.default import load_default as load_default
from akv_jax.models.llama import capture_qkv as capture_qkv
