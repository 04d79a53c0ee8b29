"""Checkpoints as files, below training, evaluation and serving, which all read them.

- ``inference``: the ``model/`` folder (safetensors weights, tokenizer, resolved config) and loading it;
- ``state``: ``TrainState``, what a checkpoint records of its run (``train_state.json``);
- ``history``: the run's history, one file per checkpoint interval;
- ``manifest``: complete checkpoints (per-worker manifests, verification, the newest complete one);
- ``best``: the checkpoint with the lowest validation loss;
- ``provenance``: what a served or exported model is.
"""

from llm_ray.checkpoint.history import (HISTORY_DIR, discard_history_after, read_history, read_train_state,
                                        write_history)
from llm_ray.checkpoint.inference import (MODEL_DIR, WEIGHTS, find_model_dir, load_model, read_config,
                                          save_inference, tied_names, write_safetensors)
from llm_ray.checkpoint.state import TrainState

__all__ = ["HISTORY_DIR", "MODEL_DIR", "WEIGHTS", "TrainState", "discard_history_after", "find_model_dir",
           "load_model", "read_config", "read_history", "read_train_state", "save_inference", "tied_names",
           "write_history", "write_safetensors"]
