"""The state-dict adapter: Hugging Face safetensors checkpoints (DeepSeek-V3 / Kimi-K2 or Mixtral names) <->
`K2ForCausalLM`.

On disk every routed expert has its own tensors (`model.layers.L.mlp.experts.E.gate_proj.weight`, Mixtral's
`model.layers.L.block_sparse_moe.experts.E.w1.weight`); in memory they are stacked
(`model.layers.L.mlp.experts.gate_proj[slot]`). All other names are identical, except Mixtral's router
(`block_sparse_moe.gate`, see `hf_mixtral`). Loading opens the shards
with `safe_open` (memory-mapped) and reads only the tensors the model holds, so a rank that holds some experts reads
only those. FP8 weights with a `weight_scale_inv` companion are dequantised on load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from k2_workers.model import hf_mixtral
from k2_workers.model.config import K2Config
from k2_workers.model.experts import RoutedExperts
from k2_workers.model.fp8 import DEFAULT_BLOCK, FP8_DTYPE, dequantize_fp8
from k2_workers.model.model import K2ForCausalLM
from k2_workers.model.moe import MoE

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
SCALE_SUFFIX = "_scale_inv"
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")

# Which experts to load: None (all), one set of logical ids for every MoE layer, or a per-layer slot table
# {layer_idx: [logical expert id of slot 0, slot 1, ...]} (replicas allowed; layers not listed hold all experts).
ExpertSelection = Collection[int] | Mapping[int, Sequence[int]] | None


class _TensorSlice(Protocol):
    def get_shape(self) -> list[int]: ...


class _TensorFile(Protocol):
    """What this module uses of an open `safetensors.safe_open` (whose stubs are untyped)."""

    def keys(self) -> list[str]: ...
    def get_slice(self, name: str) -> _TensorSlice: ...
    def get_tensor(self, name: str) -> Tensor: ...
    def __enter__(self) -> _TensorFile: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None, /
    ) -> object: ...


def _open(path: Path) -> _TensorFile:
    handle: _TensorFile = safe_open(str(path), framework="pt")
    return handle


class CheckpointError(ValueError):
    """A checkpoint lacks a tensor, or holds one of the wrong shape; the message names the tensor and the file."""


def expert_tensor_name(prefix: str, expert_id: int, projection: str) -> str:
    return f"{prefix}.{expert_id}.{projection}.weight"


def checkpoint_expert_name(config: K2Config, prefix: str, expert_id: int, projection: str) -> str:
    """The checkpoint name of one expert's projection; `prefix` is the experts module (`model.layers.L.mlp.experts`)."""
    if config.model_type == hf_mixtral.MODEL_TYPE:
        return hf_mixtral.expert_tensor_name(prefix, expert_id, projection)
    return expert_tensor_name(prefix, expert_id, projection)


def checkpoint_name(config: K2Config, name: str) -> str:
    """The checkpoint name of a (non-expert) tensor of the model's state dict."""
    return hf_mixtral.tensor_name(name) if config.model_type == hf_mixtral.MODEL_TYPE else name


# --- reading -----------------------------------------------------------------------------------------------------
class CheckpointReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint directory."""

    def __init__(self, checkpoint_dir: str | Path, fp8_block: tuple[int, int] = DEFAULT_BLOCK) -> None:
        self.dir = Path(checkpoint_dir)
        self.fp8_block = fp8_block
        index_path, single_path = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index_path.exists():
            self.weight_map: dict[str, str] = dict(json.loads(index_path.read_text())["weight_map"])
        elif single_path.exists():
            with _open(single_path) as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise CheckpointError(f"{self.dir}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        self._handles: dict[str, tuple[_TensorFile, frozenset[str]]] = {}

    def _handle(self, file_name: str) -> tuple[_TensorFile, frozenset[str]]:
        if file_name not in self._handles:
            path = self.dir / file_name
            if not path.exists():
                raise CheckpointError(f"{path}: shard listed in {INDEX_FILE} does not exist")
            handle = _open(path)
            self._handles[file_name] = (handle, frozenset(handle.keys()))
        return self._handles[file_name]

    def _locate(self, name: str) -> tuple[_TensorFile, str]:
        file_name = self.weight_map.get(name)
        if file_name is None:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {self.dir} (not in its index)")
        handle, names = self._handle(file_name)
        if name not in names:
            raise CheckpointError(f"tensor {name!r} is missing from file {self.dir / file_name}")
        return handle, file_name

    def read(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """The tensor `name`, dequantised if stored as FP8, checked against `shape`, in `dtype` on `device`."""
        handle, file_name = self._locate(name)
        stored_shape = tuple(handle.get_slice(name).get_shape())
        if stored_shape != tuple(shape):
            where = self.dir / file_name
            raise CheckpointError(f"tensor {name!r} in file {where} has shape {stored_shape}, expected {tuple(shape)}")
        tensor: Tensor = handle.get_tensor(name)
        if tensor.dtype == FP8_DTYPE:
            scale_name = name + SCALE_SUFFIX
            scale_handle, scale_file = self._locate(scale_name)
            try:
                return dequantize_fp8(tensor, scale_handle.get_tensor(scale_name), self.fp8_block, dtype).to(device)
            except ValueError as err:
                raise CheckpointError(f"tensor {scale_name!r} in file {self.dir / scale_file}: {err}") from None
        return tensor.to(device=device, dtype=dtype)

    def close(self) -> None:
        for handle, _ in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def read_config(checkpoint_dir: str | Path) -> K2Config:
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: no config.json in the checkpoint directory")
    return K2Config.from_hf_config(json.loads(path.read_text()))


def _slot_table(config: K2Config, experts: ExpertSelection) -> dict[int, list[int]]:
    """Per MoE layer, the logical expert of each slot."""
    every = list(range(config.n_routed_experts))
    if experts is None:
        return dict.fromkeys(config.moe_layer_indices, every)
    if isinstance(experts, Mapping):
        unknown = set(experts) - set(config.moe_layer_indices)
        if unknown:
            raise ValueError(f"experts: layers {sorted(unknown)} are not MoE layers {config.moe_layer_indices}")
        return {i: [int(e) for e in experts.get(i, every)] for i in config.moe_layer_indices}
    chosen = sorted({int(e) for e in experts})
    return dict.fromkeys(config.moe_layer_indices, chosen)


def load_pretrained(
    checkpoint_dir: str | Path,
    *,
    experts: ExpertSelection = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    config: K2Config | None = None,
) -> K2ForCausalLM:
    """Build `K2ForCausalLM` from a Hugging Face checkpoint directory, reading only the experts it holds.

    Parameters go to `dtype` (router correction biases stay fp32). Raises `CheckpointError` for a missing or
    mis-shaped tensor, naming the tensor and the file.
    """
    config = read_config(checkpoint_dir) if config is None else config
    slots = _slot_table(config, experts)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
        for layer_idx, expert_ids in slots.items():
            moe = model.model.layers[layer_idx].mlp
            assert isinstance(moe, MoE)
            if expert_ids != list(range(config.n_routed_experts)):
                moe.experts = RoutedExperts(
                    config.n_routed_experts, config.hidden_size, config.moe_intermediate_size, expert_ids=expert_ids
                )
    model.to_empty(device=device)
    model.tie_weights()
    model.to(dtype)
    for moe in model.moe_blocks():
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()

    block = tuple((config.extra.get("quantization_config") or {}).get("weight_block_size", DEFAULT_BLOCK))
    reader = CheckpointReader(checkpoint_dir, fp8_block=(int(block[0]), int(block[1])))
    try:
        with torch.no_grad():
            _fill(model, reader, device)
    finally:
        reader.close()
    model.reset_non_persistent_buffers()
    return model


def _fill(model: K2ForCausalLM, reader: CheckpointReader, device: torch.device | str) -> None:
    modules = dict(model.named_modules())
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        stacked = _STACKED.match(name)
        if stacked is None:
            tensor.copy_(reader.read(checkpoint_name(model.config, name), tensor.shape, tensor.dtype, device))
            continue
        prefix, projection = stacked.groups()
        held = modules[prefix]
        assert isinstance(held, RoutedExperts)
        first_slot: dict[int, int] = {}
        for slot, expert_id in enumerate(held.expert_ids):
            if expert_id in first_slot:  # a replica: copy, do not read again
                tensor[slot].copy_(tensor[first_slot[expert_id]])
                continue
            first_slot[expert_id] = slot
            source = checkpoint_expert_name(model.config, prefix, expert_id, projection)
            tensor[slot].copy_(reader.read(source, tensor.shape[1:], tensor.dtype, device))


# --- writing -----------------------------------------------------------------------------------------------------
def hf_state_dict(model: K2ForCausalLM) -> Iterator[tuple[str, Tensor]]:
    """The model's tensors under checkpoint names, experts unstacked (a replicated expert appears once)."""
    modules = dict(model.named_modules())
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        stacked = _STACKED.match(name)
        if stacked is None:
            yield checkpoint_name(model.config, name), tensor
            continue
        prefix, projection = stacked.groups()
        held = modules[prefix]
        assert isinstance(held, RoutedExperts)
        seen: set[int] = set()
        for slot, expert_id in enumerate(held.expert_ids):
            if expert_id not in seen:
                seen.add(expert_id)
                yield checkpoint_expert_name(model.config, prefix, expert_id, projection), tensor[slot]


def _shards(tensors: Iterator[tuple[str, Tensor]], max_shard_bytes: int) -> list[dict[str, Tensor]]:
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_pretrained(
    model: K2ForCausalLM,
    checkpoint_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json, `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json`.

    Weights are written in their in-memory dtype, or `dtype` (router correction biases stay fp32).
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: must be > 0, got {max_shard_bytes}")
    out = Path(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)

    def prepared() -> Iterator[tuple[str, Tensor]]:
        for name, tensor in hf_state_dict(model):
            keep_fp32 = name.endswith("e_score_correction_bias")
            target = tensor.dtype if dtype is None or keep_fp32 else dtype
            yield name, tensor.detach().to(device="cpu", dtype=target).clone()

    shards = _shards(prepared(), max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file_name), metadata={"format": "pt"})
        # safetensors creates the file 0600; a checkpoint is read by other users (the serving pods' uid), like the
        # index and config.json beside it.
        (out / file_name).chmod(0o644)
        for name, tensor in shard.items():
            weight_map[name] = file_name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    hf_config = model.config.to_hf_config()
    hf_config.pop("quantization_config", None)  # weights are written dequantised
    hf_config["torch_dtype"] = str(dtype or model.lm_head.weight.dtype).removeprefix("torch.")
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
