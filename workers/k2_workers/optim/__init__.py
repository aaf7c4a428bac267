"""MuonClip, the optimizer Kimi K2 was trained with: Muon + AdamW + per-head QK-Clip."""

from k2_workers.optim.distributed import all_reduce_max
from k2_workers.optim.muon_clip import MuonClip, match_rms_adamw_scale
from k2_workers.optim.newton_schulz import NS_COEFFICIENTS, zeropower_via_newton_schulz
from k2_workers.optim.param_groups import classify_parameter, split_parameters
from k2_workers.optim.qk_clip import MLAHeadLayout, apply_qk_clip_, clip_factors, find_mla_attentions, qk_clip_

__all__ = [
    "NS_COEFFICIENTS",
    "MLAHeadLayout",
    "MuonClip",
    "all_reduce_max",
    "apply_qk_clip_",
    "classify_parameter",
    "clip_factors",
    "find_mla_attentions",
    "match_rms_adamw_scale",
    "qk_clip_",
    "split_parameters",
    "zeropower_via_newton_schulz",
]
