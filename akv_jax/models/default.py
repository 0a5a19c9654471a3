"""Loading the tiny model experiments/toy/train_tiny.py trains on akv_jax.tasks.

A trained model is a directory with config.json (LlamaConfig fields) and an orbax checkpoint of the params (the
training log and final scores sit beside them). The shipped one is akv_jax/models/default/ (trained on a GPU;
its scores.json says how well it does); a directory without a model raises, naming the command that trains one.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import orbax.checkpoint as ocp

from akv_jax.models.config import LlamaConfig, RopeScaling
from akv_jax.models.llama import init_params

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent / "default"


def config_from_json(d: dict) -> LlamaConfig:
  d = dict(d)
  if d.get("rope_scaling") is not None:
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return LlamaConfig(**d)


def load_default(path: str | os.PathLike | None = None) -> tuple[LlamaConfig, dict]:
  """(config, params) of the shipped model, or of a directory written by experiments/toy/train_tiny.py."""
  root = pathlib.Path(path) if path is not None else DEFAULT_DIR
  if not (root / "config.json").is_file() or not (root / "params").is_dir():
    raise ValueError(f"no trained model at {root}: expected config.json and params/ "
                     "(python experiments/toy/train_tiny.py --config experiments/toy/train_tiny.yaml writes them)")
  config = config_from_json(json.loads((root / "config.json").read_text()))
  # Restore onto this process's first device, whatever the topology the checkpoint was saved from (the shipped
  # model was trained on a GPU).
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
  with ocp.StandardCheckpointer() as ckpt:
    params = ckpt.restore((root / "params").resolve(), abstract)
  return config, params
