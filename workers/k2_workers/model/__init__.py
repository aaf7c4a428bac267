"""The K2 model: Kimi-K2 / DeepSeek-V3 architecture (MLA, noaux_tc MoE); checkpoint I/O and decoding are functions
that take a model (`load_pretrained`, `save_pretrained`, `generate`, `generate_batch`)."""

from k2_workers.model.balancing import loss_free_bias_update, update_router_biases
from k2_workers.model.checkpoint import CheckpointError, load_pretrained, save_pretrained
from k2_workers.model.config import PRESET_NAMES, K2Config
from k2_workers.model.counting import activated_parameters, total_parameters
from k2_workers.model.generate import generate, generate_batch, sample_next
from k2_workers.model.kv_cache import MLACache
from k2_workers.model.model import K2ForCausalLM, K2Output
from k2_workers.model.router import switch_aux_loss

__all__ = [
    "PRESET_NAMES",
    "CheckpointError",
    "K2Config",
    "K2ForCausalLM",
    "K2Output",
    "MLACache",
    "activated_parameters",
    "generate",
    "generate_batch",
    "load_pretrained",
    "loss_free_bias_update",
    "sample_next",
    "save_pretrained",
    "switch_aux_loss",
    "total_parameters",
    "update_router_biases",
]
