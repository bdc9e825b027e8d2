"""Checkpoint files: reading them safely, checking them against the config, loading them strictly.

Weights are read from, in order of preference: ``model.safetensors``,
``model.safetensors.index.json`` (shards), ``pytorch_model.bin``, ``pytorch_model.bin.index.json``.
``.bin`` files are read with ``torch.load(weights_only=True)``: tensors only, never arbitrary
pickled code. Keys are those of the hub files, so a checkpoint saved by transformers loads with
no renaming. The model is built on the meta device and the checkpoint tensors are assigned to
it, so loading Swin-L does not first spend seconds on a random initialisation.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterable, List, Optional

import torch

from .config import MaskFormerConfig
from .hub import CheckpointError, resolve_file
from .windows import relative_position_index

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

# Tensors a checkpoint may lack: each is either unused by MaskFormer (the classification Swin's
# final norm) or derivable from the config (the relative position index, the loss's class
# weights), and is filled in when absent.
_OPTIONAL_KEYS = (
    re.compile(r"(^|\.)pixel_level_module\.encoder\.model\.layernorm\.(weight|bias)$"),
    re.compile(r"\.relative_position_index$"),
    re.compile(r"^criterion\.empty_weight$"),
)


def _read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
                              "re-download or re-save it") from exc


def _read_torch_bin(path: str) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, unsafe globals
        raise CheckpointError(
            f"{path} could not be read as a tensors-only PyTorch checkpoint ({type(exc).__name__}: {exc}); it may be "
            "corrupt, or contain pickled code, which maskformer never loads"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return state


def _read_index(index_path: str, reader) -> Dict[str, torch.Tensor]:
    try:
        with open(index_path, "r", encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {exc}") from exc
    return weight_map


def load_state_dict(path_or_repo_id, **hub_kwargs) -> Dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint (single file or shards) into a CPU state dict."""
    for filename, reader in ((SAFE_WEIGHTS, _read_safetensors), (TORCH_WEIGHTS, _read_torch_bin)):
        path = resolve_file(path_or_repo_id, filename, required=False, **hub_kwargs)
        if path is not None:
            return reader(path)
        index_name = SAFE_INDEX if reader is _read_safetensors else TORCH_INDEX
        index_path = resolve_file(path_or_repo_id, index_name, required=False, **hub_kwargs)
        if index_path is not None:
            weight_map = _read_index(index_path, reader)
            state: Dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = resolve_file(path_or_repo_id, shard, required=False, **hub_kwargs)
                if shard_path is None:
                    raise CheckpointError(f"shard {shard} listed in {index_name} is missing")
                state.update(reader(shard_path))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"{len(missing)} tensors listed in {index_name} are in no shard: {missing[:10]}")
            return state
    raise FileNotFoundError(
        f"no weights found for {os.fspath(path_or_repo_id)!r}: expected one of {SAFE_WEIGHTS}, {SAFE_INDEX}, "
        f"{TORCH_WEIGHTS}, {TORCH_INDEX}"
    )


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# transformers 5 names some decoder tensors differently in memory than in the files it writes
# (it renames on save and load); a state dict taken from a live transformers model, e.g.
# torch.save(hf_model.state_dict(), ...), uses the in-memory names.
_IN_MEMORY_RENAMES = (
    (re.compile(r"(transformer_module\.decoder\.layers\.\d+\.(?:self_attn|encoder_attn))\.o_proj\."), r"\1.out_proj."),
    (re.compile(r"(transformer_module\.decoder\.layers\.\d+)\.mlp\.(fc[12])\."), r"\1.\2."),
)


def normalize_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map transformers' in-memory decoder names (o_proj, mlp.fc1) to the file names we use."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _IN_MEMORY_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _adapt_prefix(model, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Let a MaskFormerModel load from a ForInstanceSegmentation checkpoint (drop the heads), as transformers does."""
    is_base_model = hasattr(model, "pixel_level_module")  # MaskFormerModel; the head model holds it under .model
    if is_base_model and any(k.startswith("model.") for k in state):
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    return state


def _materialise_optional(model, missing: List[str]):
    """Fill in the optional tensors a checkpoint lacked (see _OPTIONAL_KEYS), on the CPU."""
    for key in missing:
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        if attr == "relative_position_index":
            value = relative_position_index(module.window_size)
        elif attr == "empty_weight":
            value = torch.ones(model.config.num_labels + 1)
            value[-1] = model.config.no_object_weight
        elif attr == "weight":
            value = torch.ones(old.shape)
        else:
            value = torch.zeros(old.shape)
        if isinstance(old, torch.nn.Parameter):
            setattr(module, attr, torch.nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            module.register_buffer(attr, value, persistent=True)


def load_model_state(model, state: Dict[str, torch.Tensor]):
    """Assign ``state`` to ``model`` (possibly on the meta device) strictly; raise CheckpointError listing problems."""
    state = _adapt_prefix(model, normalize_keys(state))
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    optional_missing = [k for k in missing if any(p.search(k) for p in _OPTIONAL_KEYS)]
    missing = [k for k in missing if k not in optional_missing]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_format_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_format_keys(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with the wrong shape: {_format_keys(wrong_shape)}")
    if problems:
        raise CheckpointError(
            "the checkpoint does not match the model built from its config.json: " + "; ".join(problems)
            + ". Check that config.json and the weights belong to the same MaskFormer checkpoint"
        )
    if any(not torch.is_floating_point(v) and not v.dtype == torch.int64 for v in state.values()):
        bad = [k for k, v in state.items() if not (torch.is_floating_point(v) or v.dtype == torch.int64)]
        raise CheckpointError(f"unexpected tensor dtypes in the checkpoint: {_format_keys(bad)}")
    model.load_state_dict(state, strict=False, assign=True)
    _materialise_optional(model, optional_missing)


def _parse_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        value = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(value, torch.dtype):
            return value
    raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. torch.bfloat16, 'float16' or 'auto'")


def load_pretrained(cls, path_or_repo_id, *, dtype=None, device=None, config: Optional[MaskFormerConfig] = None, **hub_kwargs):
    """Build ``cls`` from a checkpoint folder or hub repo (see ``MaskFormerPreTrainedModel.from_pretrained``)."""
    torch_dtype = _parse_dtype(dtype)
    if torch_dtype is not None and not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {torch_dtype}")
    if config is None:
        config = MaskFormerConfig.from_pretrained(path_or_repo_id, **hub_kwargs)
    state = load_state_dict(path_or_repo_id, **hub_kwargs)
    with torch.device("meta"):
        model = cls(config)
    load_model_state(model, state)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # would be a bug in load_model_state; never hand out meta tensors
        raise CheckpointError(f"tensors left uninitialised after loading: {_format_keys(leftover)}")
    if torch_dtype is not None:
        model.to(torch_dtype)  # floating tensors only; the int64 index buffers stay
    if device is not None:
        model.to(device)
    return model.eval()


def save_pretrained(model, save_directory, *, safe_serialization: bool = True, max_shard_size=None) -> str:
    """Write config.json and the weights into ``save_directory`` (created if needed).

    ``max_shard_size`` (bytes, or a string such as "200MB") splits the weights into shards with an
    index file, as transformers does.
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise FileExistsError(f"{save_directory!r} is a file; save_pretrained needs a folder")
    os.makedirs(save_directory, exist_ok=True)
    model.config.save_pretrained(save_directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    limit = _parse_size(max_shard_size)
    shards = _split(state, limit)
    weights_name = SAFE_WEIGHTS if safe_serialization else TORCH_WEIGHTS
    # Remove stale weight files of the other layout, so the folder holds one checkpoint only.
    for stale in (SAFE_WEIGHTS, SAFE_INDEX, TORCH_WEIGHTS, TORCH_INDEX):
        stale_path = os.path.join(save_directory, stale)
        if os.path.exists(stale_path):
            os.remove(stale_path)
    if len(shards) == 1:
        _write(shards[0], os.path.join(save_directory, weights_name), safe_serialization)
        return save_directory
    stem, ext = weights_name.rsplit(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        _write(shard, os.path.join(save_directory, name), safe_serialization)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(save_directory, SAFE_INDEX if safe_serialization else TORCH_INDEX), "w") as f:
        json.dump(index, f, indent=2)
    return save_directory


def _parse_size(size) -> Optional[int]:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size such as 200000000, '200MB' or '2GiB'")
    number, unit = float(match.group(1)), match.group(2).upper()
    scale = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(number * scale)


def _split(state: Dict[str, torch.Tensor], limit: Optional[int]) -> List[Dict[str, torch.Tensor]]:
    if limit is None:
        return [state]
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _write(state: Dict[str, torch.Tensor], path: str, safe: bool):
    if safe:
        from safetensors.torch import save_file

        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)
