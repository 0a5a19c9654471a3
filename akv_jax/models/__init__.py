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
