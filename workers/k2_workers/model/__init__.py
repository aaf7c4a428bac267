"""The K2 model: Kimi-K2 / DeepSeek-V3 architecture (MLA, noaux_tc MoE), its checkpoint I/O and generation."""

from k2_workers.model.config import PRESET_NAMES, K2Config
from k2_workers.model.counting import activated_parameters, total_parameters
from k2_workers.model.kv_cache import MLACache
from k2_workers.model.model import K2ForCausalLM, K2Output
from k2_workers.model.router import loss_free_bias_update, switch_aux_loss

__all__ = [
    "PRESET_NAMES",
    "K2Config",
    "K2ForCausalLM",
    "K2Output",
    "MLACache",
    "activated_parameters",
    "loss_free_bias_update",
    "switch_aux_loss",
    "total_parameters",
]
