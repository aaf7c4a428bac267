"""The K2 model: Kimi-K2 / DeepSeek-V3 architecture (MLA, noaux_tc MoE), and Mixtral's (GQA, softmax top-2) and
Switch-style top-1 routing with capacity on the same modules; checkpoint I/O and decoding are functions that take a
model (`load_pretrained`, `save_pretrained`, `generate`, `generate_batch`)."""

from k2_workers.model.balancing import loss_free_bias_update, update_router_biases
from k2_workers.model.checkpoint import CheckpointError, load_pretrained, save_pretrained
from k2_workers.model.config import PRESET_NAMES, K2Config
from k2_workers.model.counting import activated_parameters, total_parameters
from k2_workers.model.decoding import generate, generate_batch, sample_next
from k2_workers.model.kv_cache import GQACache, KVCache, MLACache, new_cache
from k2_workers.model.model import K2ForCausalLM, K2Output
from k2_workers.model.router import switch_aux_loss
from k2_workers.model.switch import switch_routing

__all__ = [
    "PRESET_NAMES",
    "CheckpointError",
    "GQACache",
    "K2Config",
    "K2ForCausalLM",
    "K2Output",
    "KVCache",
    "MLACache",
    "activated_parameters",
    "generate",
    "generate_batch",
    "load_pretrained",
    "loss_free_bias_update",
    "new_cache",
    "sample_next",
    "save_pretrained",
    "switch_aux_loss",
    "switch_routing",
    "total_parameters",
    "update_router_biases",
]
