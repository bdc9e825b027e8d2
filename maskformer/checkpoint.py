"""Checkpoint files: reading them safely, checking them against the config, loading them strictly.

Weights are read from, in order of preference: ``model.safetensors``,
``model.safetensors.index.json`` (shards), ``pytorch_model.bin``, ``pytorch_model.bin.index.json``.
``.bin`` files are read with ``torch.load(weights_only=True)``: tensors only, never arbitrary
pickled code. Keys are those of the hub files, so a checkpoint saved by transformers loads with
no renaming.

Loading runs in this order, so a bad file fails before anything large is read or built:
1. the config is checked field by field (``MaskFormerConfig.validate``);
2. the checkpoint's tensor names, shapes and dtypes are read from the file headers only, a shard
   index may only name plain files inside the checkpoint folder;
3. the sizes the config implies (stages, blocks, window, heads, layers, queries, classes, widths)
   are compared with the checkpoint's tensors, naming the config field that disagrees;
4. the model is built on the meta device and every expected tensor is matched to the checkpoint
   by name and shape; only then are the tensors read and assigned (a stored
   ``relative_position_index`` must equal the one the config defines).
The model is never randomly initialised first, so loading Swin-L does not spend seconds on that.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MaskFormerConfig
from .hub import HUB_KWARGS, CheckpointError, check_relative_name, resolve_file
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
    re.compile(r"(^|\.)pixel_level_module\.encoder\.swin\.layernorm\.(weight|bias)$"),  # Mask2Former's layout
    re.compile(r"\.relative_position_index$"),
    re.compile(r"^criterion\.empty_weight$"),
)
# The heads a MaskFormerModel checkpoint does not have: initialised (with a warning) when all are absent.
_HEAD_KEYS = re.compile(r"^(class_predictor|mask_embedder)\.")
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CheckpointFiles:
    """Local paths of a checkpoint's weight files: one file, or the shards an index lists."""

    paths: List[str]
    safetensors: bool
    index: Optional[str] = None  # the index's path, for messages
    weight_map: Optional[Dict[str, str]] = None


def _read_index(index_path: str) -> Dict[str, str]:
    """The index's ``weight_map`` {tensor name: shard file name}, every shard name a plain file inside the folder."""
    try:
        with open(index_path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index ({exc}); re-download the checkpoint") from exc
    except RecursionError:
        raise CheckpointError(f"{index_path} nests its JSON deeper than the parser can follow; the shard index is "
                              "corrupt or hostile: re-download the checkpoint") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index_path}: weight_map must be an object mapping tensor names to shard file names, got "
            f"{type(weight_map).__name__}; re-download the checkpoint"
        )
    for key, shard in weight_map.items():
        if not isinstance(key, str) or not isinstance(shard, str):
            raise CheckpointError(f"{index_path}: weight_map must map names (strings) to shard file names, got "
                                  f"{key!r}: {shard!r}")
        check_relative_name(shard, f"the shard of tensor {key!r} in {os.path.basename(index_path)},",
                            "; the index is corrupt or hostile: re-download the checkpoint")
    return weight_map


def find_checkpoint_files(path_or_repo_id, *, use_safetensors: Optional[bool] = None, **hub_kwargs) -> CheckpointFiles:
    """Locate the weight files (see the module docstring for the order); ``use_safetensors`` True or
    False restricts the search to that format, as transformers' argument of the same name."""
    kinds = [(True, SAFE_WEIGHTS, SAFE_INDEX), (False, TORCH_WEIGHTS, TORCH_INDEX)]
    if use_safetensors is not None:
        kinds = [k for k in kinds if k[0] == bool(use_safetensors)]
    for safe, filename, index_name in kinds:
        path = resolve_file(path_or_repo_id, filename, required=False, **hub_kwargs)
        if path is not None:
            return CheckpointFiles([path], safe)
        index_path = resolve_file(path_or_repo_id, index_name, required=False, **hub_kwargs)
        if index_path is not None:
            weight_map = _read_index(index_path)
            paths = []
            for shard in sorted(set(weight_map.values())):
                shard_path = resolve_file(path_or_repo_id, shard, required=False, **hub_kwargs)
                if shard_path is None:
                    raise CheckpointError(f"shard {shard} listed in {index_name} is missing")
                paths.append(shard_path)
            return CheckpointFiles(paths, safe, index_path, weight_map)
    names = ", ".join(n for _, f, i in kinds for n in (f, i))
    raise FileNotFoundError(f"no weights found for {os.fspath(path_or_repo_id)!r}: expected one of {names}")


def _read_safetensors(path: str, shapes_only: bool = False):
    try:
        if not shapes_only:
            return load_file(path)
        out = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                dtype = _SAFE_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise CheckpointError(f"{path}: tensor {key} has dtype {view.get_dtype()}; a MaskFormer checkpoint "
                                          "holds floating tensors and int64 indices only")
                out[key] = torch.empty(view.get_shape(), dtype=dtype, device="meta")
        return out
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
                              "re-download or re-save it") from exc
    except (MemoryError, RuntimeError) as exc:
        # safetensors maps the file: under an address-space or memory limit the map fails with ENOMEM
        # (safe_open: MemoryError "Cannot allocate memory (os error 12)", naming no file; torch's reader:
        # RuntimeError "unable to mmap"). Anything else is not ours to reword.
        if isinstance(exc, RuntimeError) and "mmap" not in str(exc):
            raise
        size = os.path.getsize(path)
        raise MemoryError(
            f"{path} ({size / 1e6:.0f} MB) could not be mapped into memory ({exc}): the process's memory or address-space "
            "limit (ulimit -v, a container limit) is below what reading it needs; raise the limit or free memory"
        ) from exc


def _read_torch_bin(path: str, shapes_only: bool = False) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="meta" if shapes_only else "cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, unsafe globals
        raise CheckpointError(
            f"{path} could not be read as a tensors-only PyTorch checkpoint ({type(exc).__name__}: {exc}); it may be "
            "corrupt, or contain pickled code, which maskformer never loads"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors (a state dict)")
    return state


def read_checkpoint(files: CheckpointFiles, shapes_only: bool = False) -> Dict[str, torch.Tensor]:
    """Every tensor of the files, on the CPU; with ``shapes_only``, meta tensors (names, shapes and
    dtypes from the headers, no data read)."""
    reader = _read_safetensors if files.safetensors else _read_torch_bin
    state: Dict[str, torch.Tensor] = {}
    for path in files.paths:
        state.update(reader(path, shapes_only))
    if files.weight_map is not None:
        missing = sorted(set(files.weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{len(missing)} tensors listed in {os.path.basename(files.index)} are in no shard: "
                                  f"{missing[:10]}")
    bad = [k for k, v in state.items() if not (v.is_floating_point() or v.dtype == torch.int64)]
    if bad:
        raise CheckpointError(f"unexpected tensor dtypes in the checkpoint: {_format_keys(bad)}")
    return state


def load_state_dict(path_or_repo_id, **hub_kwargs) -> Dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint (single file or shards) into a CPU state dict."""
    return read_checkpoint(find_checkpoint_files(path_or_repo_id, **hub_kwargs))


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
    # transformers 5's generic Swin (Mask2Former's backbone) in memory: swin.embeddings / swin.encoder,
    # q/k/v/o_proj, relative_position_bias.*, mlp.fc1/fc2; its files keep the names on the right.
    (re.compile(r"(pixel_level_module\.encoder)\.swin\.(embeddings|encoder)\."), r"\1.\2."),
    (re.compile(r"(blocks\.\d+\.attention)\.q_proj\."), r"\1.self.query."),
    (re.compile(r"(blocks\.\d+\.attention)\.k_proj\."), r"\1.self.key."),
    (re.compile(r"(blocks\.\d+\.attention)\.v_proj\."), r"\1.self.value."),
    (re.compile(r"(blocks\.\d+\.attention)\.o_proj\."), r"\1.output.dense."),
    (re.compile(r"(blocks\.\d+\.attention)\.relative_position_bias\.relative_position_bias_table$"),
     r"\1.self.relative_position_bias_table"),
    (re.compile(r"(blocks\.\d+)\.mlp\.fc1\."), r"\1.intermediate.dense."),
    (re.compile(r"(blocks\.\d+)\.mlp\.fc2\."), r"\1.output.dense."),
)


def normalize_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map transformers' in-memory decoder names (o_proj, mlp.fc1) to the file names we use."""
    out = {}
    for key, value in state.items():
        for pattern, repl in _IN_MEMORY_RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _is_base_model(model) -> bool:
    return _is_base_model_class(type(model))


def _is_base_model_class(cls) -> bool:
    # Where the model's own tensors start in a checkpoint: "" for MaskFormerModel, "model." for the
    # model with heads (transformers' base_model_prefix).
    return getattr(cls, "checkpoint_prefix", "model.") == ""


def _rename_for(cls, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Apply the model class's own checkpoint renames (``checkpoint_key_renames``: (regex, replacement)
    pairs), e.g. Mask2Former's backbone stored in the MaskFormer-Swin layout."""
    renames = getattr(cls, "checkpoint_key_renames", ())
    if not renames:
        return state
    out = {}
    for key, value in state.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _to_model_keys(state: Dict[str, torch.Tensor], base_model: bool) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(the checkpoint's tensors under the model's names, the checkpoint keys dropped).

    A MaskFormerModel loads from a ForInstanceSegmentation checkpoint (its heads are dropped and
    reported as unexpected, as transformers does), and a ForInstanceSegmentation model from a
    MaskFormerModel checkpoint (its keys gain the ``model.`` prefix; the heads are then missing).
    """
    state = normalize_keys(state)
    has_prefix = any(k.startswith("model.") for k in state)
    if base_model and has_prefix:
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, \
            [k for k in state if not k.startswith("model.")]
    if not base_model and not has_prefix and any(k.startswith(("pixel_level_module.", "transformer_module.")) for k in state):
        return {(f"model.{k}" if k.startswith(("pixel_level_module.", "transformer_module.")) else k): v
                for k, v in state.items()}, []
    return state, []


# ---------------------------------------------------------------------------------------------
# The config against the checkpoint, before the model is built
# ---------------------------------------------------------------------------------------------
def _count(state, pattern: str) -> Dict[int, Set[int]]:
    """{first captured index: set of second captured indices (or {0})} over the keys matching ``pattern``."""
    found: Dict[int, Set[int]] = {}
    regex = re.compile(pattern)
    for key in state:
        m = regex.match(key)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)) if m.lastindex > 1 else 0)
    return found


def _shape_of(shapes, key):
    t = shapes.get(key)
    return tuple(t.shape) if t is not None else None


def _checkers(shapes: Dict[str, torch.Tensor], problems: List[str]):
    """(shape(key) -> the checkpoint tensor's shape or None, disagree(field, value, found, key) -> one
    problem naming the config field), shared by the config-against-checkpoint checks."""
    def shape(key):
        return _shape_of(shapes, key)

    def disagree(field, value, found, key):
        problems.append(f"{field}={value} but the checkpoint has {found} ({key} {shape(key)})")

    return shape, disagree


def _swin_problems(bb, shapes: Dict[str, torch.Tensor], enc: str) -> List[str]:
    """What the Swin backbone config ``bb`` gets wrong about the checkpoint's tensors under ``enc``."""
    problems: List[str] = []

    shape, disagree = _checkers(shapes, problems)

    key = enc + "embeddings.patch_embeddings.projection.weight"
    if shape(key) is not None and len(shape(key)) == 4:
        e, c, ph, pw = shape(key)
        patch = bb.patch_size if isinstance(bb.patch_size, list) else [bb.patch_size] * 2
        if e != bb.embed_dim:
            disagree("backbone_config.embed_dim", bb.embed_dim, e, key)
        if c != bb.num_channels:
            disagree("backbone_config.num_channels", bb.num_channels, c, key)
        if [ph, pw] != list(patch):
            disagree("backbone_config.patch_size", bb.patch_size, [ph, pw], key)
    blocks = _count(shapes, re.escape(enc) + r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
    if blocks:
        stages = max(blocks) + 1
        if stages != len(bb.depths):
            problems.append(f"backbone_config.depths={bb.depths} has {len(bb.depths)} stages but the checkpoint has "
                            f"{stages} ({enc}encoder.layers.0-{stages - 1})")
        else:
            found = [max(blocks.get(i, {-1})) + 1 for i in range(stages)]
            if found != bb.depths:
                problems.append(f"backbone_config.depths={bb.depths} but the checkpoint has {found} blocks per stage")
        for i in range(min(stages, len(bb.depths))):
            key = f"{enc}encoder.layers.{i}.blocks.0.attention.self.relative_position_bias_table"
            if shape(key) is not None and len(shape(key)) == 2:
                rows, heads = shape(key)
                side = (round(rows ** 0.5) + 1) // 2
                if rows != (2 * bb.window_size - 1) ** 2:
                    found = f"window_size {side}" if (2 * side - 1) ** 2 == rows else f"{rows} rows"
                    disagree("backbone_config.window_size", bb.window_size, found, key)
                    break
                if heads != bb.num_heads[i]:
                    disagree(f"backbone_config.num_heads[{i}]", bb.num_heads[i], f"{heads} heads", key)
            key = f"{enc}encoder.layers.{i}.blocks.0.intermediate.dense.weight"
            dim = bb.embed_dim * 2**i
            if shape(key) is not None and len(shape(key)) == 2 and shape(key)[0] != int(bb.mlp_ratio * dim):
                disagree("backbone_config.mlp_ratio", bb.mlp_ratio, f"{shape(key)[0]} hidden units on {dim} channels", key)
    return problems


def _class_head_problem(config, shapes, base_model: bool, ignore_mismatched_sizes: bool) -> List[str]:
    key = "class_predictor.weight"
    found = _shape_of(shapes, key)
    if not base_model and not ignore_mismatched_sizes and found is not None and found[0] != config.num_labels + 1:
        return [
            f"num_labels={config.num_labels} but the checkpoint's class head has {found[0] - 1} classes (+ the null "
            f"class: {key} {found}); to fine-tune with another number of classes pass ignore_mismatched_sizes=True "
            "to re-initialise the head"
        ]
    return []


def _raise_config_problems(problems: List[str]) -> None:
    if problems:
        raise CheckpointError(
            "config.json does not describe these weights: " + "; ".join(problems)
            + ". Use the config.json that came with the weights (or pass the right config=)"
        )


def check_config_against_checkpoint(config: MaskFormerConfig, shapes: Dict[str, torch.Tensor], base_model: bool,
                                    ignore_mismatched_sizes: bool = False) -> None:
    """Compare the sizes the config implies with the checkpoint's tensors (meta tensors are enough)
    and raise CheckpointError naming each config field that disagrees. Runs before the model is
    built, so ``decoder_layers=100`` against a 6-layer checkpoint costs nothing."""
    bb, dec = config.backbone_config, config.decoder_config
    prefix = "" if base_model else "model."
    enc = f"{prefix}pixel_level_module.encoder.model."
    problems = []

    shape, disagree = _checkers(shapes, problems)

    problems.extend(_swin_problems(bb, shapes, enc))
    key = f"{prefix}pixel_level_module.decoder.fpn.stem.0.weight"
    if shape(key) is not None and shape(key)[0] != config.fpn_feature_size:
        disagree("fpn_feature_size", config.fpn_feature_size, shape(key)[0], key)
    key = f"{prefix}pixel_level_module.decoder.mask_projection.weight"
    if shape(key) is not None and shape(key)[0] != config.mask_feature_size:
        disagree("mask_feature_size", config.mask_feature_size, shape(key)[0], key)
    tm = f"{prefix}transformer_module."
    key = tm + "queries_embedder.weight"
    if shape(key) is not None and len(shape(key)) == 2:
        if shape(key)[0] != dec.num_queries:
            disagree("decoder_config.num_queries", dec.num_queries, f"{shape(key)[0]} queries", key)
        if shape(key)[1] != dec.d_model:
            disagree("decoder_config.d_model", dec.d_model, shape(key)[1], key)
    layers = _count(shapes, re.escape(tm) + r"decoder\.layers\.(\d+)\.")
    if layers and max(layers) + 1 != dec.decoder_layers:
        problems.append(f"decoder_config.decoder_layers={dec.decoder_layers} but the checkpoint has {max(layers) + 1} "
                        f"decoder layers ({tm}decoder.layers.0-{max(layers)})")
    key = tm + "decoder.layers.0.fc1.weight"
    if shape(key) is not None and shape(key)[0] != dec.decoder_ffn_dim:
        disagree("decoder_config.decoder_ffn_dim", dec.decoder_ffn_dim, shape(key)[0], key)
    problems.extend(_class_head_problem(config, shapes, base_model, ignore_mismatched_sizes))
    _raise_config_problems(problems)


def check_mask2former_config_against_checkpoint(config, shapes: Dict[str, torch.Tensor], base_model: bool,
                                                ignore_mismatched_sizes: bool = False) -> None:
    """``check_config_against_checkpoint`` for a ``Mask2FormerConfig``: the backbone (transformers'
    generic Swin layout), the pixel decoder's width and layers, the decoder's width, layers and
    queries, and the class head, each named by its config field."""
    prefix = "" if base_model else "model."
    problems = _swin_problems(config.backbone_config, shapes, f"{prefix}pixel_level_module.encoder.")

    shape, disagree = _checkers(shapes, problems)

    pd = f"{prefix}pixel_level_module.decoder."
    key = pd + "level_embed"
    if shape(key) is not None and len(shape(key)) == 2 and shape(key)[1] != config.feature_size:
        disagree("feature_size", config.feature_size, shape(key)[1], key)
    key = pd + "mask_projection.weight"
    if shape(key) is not None and shape(key)[0] != config.mask_feature_size:
        disagree("mask_feature_size", config.mask_feature_size, shape(key)[0], key)
    layers = _count(shapes, re.escape(pd) + r"encoder\.layers\.(\d+)\.")
    if layers and max(layers) + 1 != config.encoder_layers:
        problems.append(f"encoder_layers={config.encoder_layers} but the checkpoint has {max(layers) + 1} deformable "
                        f"encoder layers ({pd}encoder.layers.0-{max(layers)})")
    key = pd + "encoder.layers.0.fc1.weight"
    if shape(key) is not None and shape(key)[0] != config.encoder_feedforward_dim:
        disagree("encoder_feedforward_dim", config.encoder_feedforward_dim, shape(key)[0], key)
    key = pd + "encoder.layers.0.self_attn.attention_weights.weight"
    if shape(key) is not None and shape(key)[0] != config.num_attention_heads * 12:
        disagree("num_attention_heads", config.num_attention_heads, f"{shape(key)[0] // 12} heads (x 3 levels x 4 points)", key)
    tm = f"{prefix}transformer_module."
    key = tm + "queries_features.weight"
    if shape(key) is not None and len(shape(key)) == 2:
        if shape(key)[0] != config.num_queries:
            disagree("num_queries", config.num_queries, f"{shape(key)[0]} queries", key)
        if shape(key)[1] != config.hidden_dim:
            disagree("hidden_dim", config.hidden_dim, shape(key)[1], key)
    layers = _count(shapes, re.escape(tm) + r"decoder\.layers\.(\d+)\.")
    found = max(layers) + 2 if layers else (1 if shape(tm + "decoder.layernorm.weight") is not None else None)
    if found is not None and found != config.decoder_layers:
        problems.append(f"decoder_layers={config.decoder_layers} but the checkpoint has {found - 1} decoder layers "
                        f"(decoder_layers counts them + 1, the prediction before the first)")
    key = tm + "decoder.layers.0.fc1.weight"
    if shape(key) is not None and shape(key)[0] != config.dim_feedforward:
        disagree("dim_feedforward", config.dim_feedforward, shape(key)[0], key)
    problems.extend(_class_head_problem(config, shapes, base_model, ignore_mismatched_sizes))
    _raise_config_problems(problems)


# ---------------------------------------------------------------------------------------------
# Matching, initialising and assigning
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadPlan:
    """How the checkpoint's tensors map onto the model (keys in the model's names)."""

    missing: List[str]  # expected by the model, absent from the checkpoint
    unexpected: List[str]  # in the checkpoint, unknown to the model
    mismatched: List[Tuple[str, torch.Size, torch.Size]]  # (key, checkpoint shape, model shape)
    derived: List[str]  # missing but derivable / unused (see _OPTIONAL_KEYS): filled in quietly
    initialised: List[str]  # missing heads, or mismatched with ignore_mismatched_sizes: random init
    dropped: List[str]  # checkpoint keys the model does not use (a base model's view of the heads)

    def loading_info(self) -> dict:
        """transformers' ``output_loading_info`` dict."""
        return {
            "missing_keys": set(self.missing),
            "unexpected_keys": set(self.unexpected) | set(self.dropped),
            "mismatched_keys": set(self.mismatched),
            "error_msgs": [],
        }


def plan_loading(model, shapes: Dict[str, torch.Tensor], *, ignore_mismatched_sizes: bool = False,
                 strict: Optional[bool] = None, dropped: Optional[List[str]] = None) -> LoadPlan:
    """Match ``shapes`` (model names; meta tensors suffice) to ``model``'s tensors, or raise CheckpointError listing
    every problem.

    ``strict``: None (the default) initialises the heads when all of them are missing (a MaskFormerModel
    checkpoint) and refuses any other missing tensor and any unexpected one; True refuses missing heads
    too; False follows transformers' loading: every missing tensor is initialised (and listed in
    ``missing_keys``), unexpected ones are left out (and listed in ``unexpected_keys``). A wrongly
    shaped tensor is an error unless ``ignore_mismatched_sizes``, as in transformers."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in shapes]
    # A stored relative_position_index where the model keeps it unsaved (Mask2Former's backbone, as
    # transformers 5): checked against the window size in assign_state, then dropped.
    unsaved = {k for k, _ in model.named_buffers() if k.endswith(".relative_position_index") and k not in expected}
    dropped = list(dropped or []) + [k for k in shapes if k in unsaved]
    unexpected = [k for k in shapes if k not in expected and k not in unsaved]
    mismatched = [(k, shapes[k].shape, expected[k].shape) for k in expected
                  if k in shapes and tuple(shapes[k].shape) != tuple(expected[k].shape)]
    derived = [k for k in missing if any(p.search(k) for p in _OPTIONAL_KEYS)]
    head_keys = [k for k in expected if _HEAD_KEYS.match(k)]
    heads_absent = bool(head_keys) and all(k in missing for k in head_keys)
    if strict is False:
        initialised = [k for k in missing if k not in derived]
    else:
        initialised = head_keys if heads_absent and not strict else []
    fatal_missing = [k for k in missing if k not in derived and k not in initialised]
    if ignore_mismatched_sizes:
        initialised = initialised + [k for k, _, _ in mismatched if k not in derived]
    problems = []
    if fatal_missing:
        why = " (strict=True: the heads are not initialised)" if strict and heads_absent else ""
        problems.append(f"{len(fatal_missing)} missing{why}: {_format_keys(fatal_missing)}")
    if unexpected and strict is not False:
        problems.append(f"{len(unexpected)} unexpected: {_format_keys(unexpected)}")
    if mismatched and not ignore_mismatched_sizes:
        shown = [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]
        problems.append(f"{len(mismatched)} with the wrong shape (ignore_mismatched_sizes=True re-initialises them): "
                        f"{_format_keys(shown)}")
    if problems:
        implied = sum(t.numel() for k, t in expected.items() if k not in derived)
        held = sum(t.numel() for t in shapes.values())
        loose = "" if strict is False else (" (strict=False initialises missing tensors and skips unexpected ones, as "
                                            "transformers does)")
        raise CheckpointError(
            "the checkpoint does not match the model built from its config.json: " + "; ".join(problems)
            + f". The config implies {implied:,} values, the checkpoint holds {held:,}. Check that config.json and "
            f"the weights belong to the same MaskFormer checkpoint{loose}"
        )
    return LoadPlan(missing, unexpected, mismatched, derived, initialised, dropped)


def _initial_value(model, key: str, shape, dtype) -> torch.Tensor:
    """A fresh value for ``key``: derived when the config defines it, else our initialisation
    (norms 1/0, biases 0, heads' and pixel decoder's weights Xavier-uniform with gain
    ``init_xavier_std``, other weights N(0, init_std))."""
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    config = model.config
    if attr == "relative_position_index":
        return relative_position_index(module.window_size)
    if attr == "empty_weight":
        value = torch.ones(config.num_labels + 1, dtype=dtype)
        value[-1] = config.no_object_weight
        return value
    value = torch.empty(tuple(shape), dtype=dtype)
    with torch.no_grad():
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return value.fill_(1.0 if attr == "weight" else 0.0)
        if attr == "bias" or value.dim() < 2:
            return value.zero_()
        if "mask_embedder." in key or "pixel_level_module.decoder." in key or "input_projection" in key:
            return nn.init.xavier_uniform_(value, gain=config.init_xavier_std)
        return value.normal_(0.0, config.init_std)


def assign_state(model, state: Dict[str, torch.Tensor], plan: LoadPlan) -> None:
    """Assign the checkpoint tensors (model names) to ``model`` (possibly on the meta device) and fill
    in what ``plan`` derives or initialises. A stored relative_position_index must equal the one the
    config's window size defines: a different one would silently give wrong outputs."""
    skip = {k for k, _, _ in plan.mismatched} | set(plan.unexpected)
    state = {k: v for k, v in state.items() if k not in skip}
    indices: Dict[int, torch.Tensor] = {}
    for key in [k for k in state if k.endswith(".relative_position_index")]:
        module = model.get_submodule(key.rpartition(".")[0])
        want = indices.setdefault(module.window_size, relative_position_index(module.window_size))
        got = state[key]
        if got.shape != want.shape or not torch.equal(got.to(want.dtype), want):
            where = (got.to(want.dtype) != want).nonzero()[0].tolist() if got.shape == want.shape else None
            detail = (f"first difference at {tuple(where)}: stored {int(got[tuple(where)])}, expected "
                      f"{int(want[tuple(where)])}") if where is not None else f"shape {tuple(got.shape)}"
            raise CheckpointError(
                f"{key} differs from the relative position index that window_size={module.window_size} defines "
                f"({detail}); the checkpoint is corrupt or was edited. Delete that tensor from the file to have it "
                "recomputed, or re-download the checkpoint"
            )
        state[key] = want.clone()  # one tensor per block: safetensors refuses shared storage on save
    model.load_state_dict(state, strict=False, assign=True)
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    dtype = floats[0] if floats else torch.float32
    expected = model.state_dict()
    for key in plan.derived + plan.initialised:
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        value = _initial_value(model, key, expected[key].shape, dtype if old.is_floating_point() else old.dtype)
        if isinstance(old, nn.Parameter):
            setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            module.register_buffer(attr, value, persistent=True)


def load_model_state(model, state: Dict[str, torch.Tensor], *, ignore_mismatched_sizes: bool = False,
                     strict: Optional[bool] = None) -> LoadPlan:
    """Assign an in-memory state dict (file names or transformers' in-memory names) to ``model``
    (possibly on the meta device), with the rules of ``from_pretrained``; returns the plan."""
    state, dropped = _to_model_keys(_rename_for(type(model), state), _is_base_model(model))
    plan = plan_loading(model, state, ignore_mismatched_sizes=ignore_mismatched_sizes, strict=strict, dropped=dropped)
    assign_state(model, state, plan)
    return plan


# ---------------------------------------------------------------------------------------------
# from_pretrained
# ---------------------------------------------------------------------------------------------
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


def resolve_device_map(device_map) -> Optional[torch.device]:
    """The single device a ``device_map`` names. maskformer places the whole model on one device:
    "auto" (and "balanced"/"sequential" with at most one GPU) means the GPU if there is one, else
    the CPU; a dict must send every module to the same device."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(torch.device(f"cuda:{d}" if isinstance(d, int) else d)) for d in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map={device_map!r} splits the model across {sorted(devices)}; maskformer loads the whole model "
                "on one device (no model parallelism): pass device_map='cuda:0', 'cpu' or 'auto' (or device=)"
            )
        return torch.device(devices.pop())
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device_map != "auto" and gpus > 1:
            raise ValueError(
                f"device_map={device_map!r} spreads the model over {gpus} GPUs; maskformer loads the whole model on one "
                "device: pass device_map='auto' or 'cuda:0' (or device=)"
            )
        return torch.device("cuda:0" if gpus else "cpu")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device(f"cuda:{device_map}")
    try:
        return torch.device(device_map)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"device_map={device_map!r} is not a device, 'auto' or a dict of devices") from None


# Keyword arguments transformers users pass that change nothing here, with the reason.
IGNORED_KWARGS = {
    "trust_remote_code": "maskformer never runs code from a checkpoint",
    "low_cpu_mem_usage": "always on: the weights are assigned to a model built on the meta device",
    "attn_implementation": "maskformer's attention is its own (dispatch picks the kernel); results are the same",
    "_from_auto": "transformers' internal flag",
    "_from_pipeline": "transformers' internal flag",
}
def load_pretrained(cls, path_or_repo_id, *, dtype=None, device=None, config=None, device_map=None,
                    ignore_mismatched_sizes: bool = False, output_loading_info: bool = False,
                    strict: Optional[bool] = None, use_safetensors: Optional[bool] = None, state_dict=None, **kwargs):
    """Build ``cls`` from a checkpoint folder or hub repo, or from ``config=`` and ``state_dict=`` with
    ``path_or_repo_id=None`` (see ``MaskFormerPreTrainedModel.from_pretrained``)."""
    if "torch_dtype" in kwargs:  # transformers' older spelling
        alias = kwargs.pop("torch_dtype")
        if dtype is not None and _parse_dtype(alias) != _parse_dtype(dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={alias!r} disagree; pass one of them")
        dtype = alias if dtype is None else dtype
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    for name in IGNORED_KWARGS:
        kwargs.pop(name, None)
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.config_class.override_names()}
    if kwargs:
        raise TypeError(
            f"from_pretrained() got unexpected keyword argument(s) {sorted(kwargs)}. It accepts dtype (torch_dtype), "
            f"device, device_map, config, ignore_mismatched_sizes, output_loading_info, strict, use_safetensors, the "
            f"hub arguments {', '.join(HUB_KWARGS)}, and config fields to override (num_labels, id2label, label2id, "
            "output_hidden_states, ...)"
        )
    torch_dtype = _parse_dtype(dtype)
    if torch_dtype is not None and not torch_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {torch_dtype}")
    target = resolve_device_map(device_map)
    if target is not None and device is not None and torch.device(device) != target:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    device = target if target is not None else device

    if strict not in (None, True, False):
        raise TypeError(f"strict must be None (the default), True or False, got {strict!r}")
    config_class = cls.config_class
    if path_or_repo_id is None and (config is None or state_dict is None):
        raise TypeError(
            f"{cls.__name__}.from_pretrained(None, ...) builds the model from config= and state_dict= (both needed, as in "
            "transformers); or pass a checkpoint folder or hub repo id"
        )
    if state_dict is not None and not (isinstance(state_dict, dict) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items())):
        raise TypeError("state_dict must be a dict of tensor names to tensors (e.g. model.state_dict())")
    if config is None:
        config = config_class.from_pretrained(path_or_repo_id, **hub_kwargs)
    elif not isinstance(config, config_class):
        config = config_class.from_dict(config if isinstance(config, dict) else config.to_dict())
    config = config.with_overrides(**overrides)
    config.validate()  # every field, before any weight is read or any module built
    base_model = _is_base_model_class(cls)
    if state_dict is not None:  # transformers' state_dict=: these tensors instead of the checkpoint's files
        files = None
        shapes, dropped = _to_model_keys(_rename_for(cls, dict(state_dict)), base_model)
    else:
        files = find_checkpoint_files(path_or_repo_id, use_safetensors=use_safetensors, **hub_kwargs)
        shapes, dropped = _to_model_keys(_rename_for(cls, read_checkpoint(files, shapes_only=True)), base_model)
    if isinstance(config, MaskFormerConfig):
        check_config_against_checkpoint(config, shapes, base_model, ignore_mismatched_sizes)
    else:
        check_mask2former_config_against_checkpoint(config, shapes, base_model, ignore_mismatched_sizes)
    with torch.device("meta"):
        model = cls(config)
    plan = plan_loading(model, shapes, ignore_mismatched_sizes=ignore_mismatched_sizes, strict=strict, dropped=dropped)
    if files is None:
        state = {k: v.detach().to("cpu", copy=True) for k, v in shapes.items()}  # the caller's tensors stay theirs
    else:
        state, _ = _to_model_keys(_rename_for(cls, read_checkpoint(files)), base_model)
    assign_state(model, state, plan)
    del state
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:  # would be a bug in assign_state; never hand out meta tensors
        raise CheckpointError(f"tensors left uninitialised after loading: {_format_keys(leftover)}")
    _warn_initialised(cls.__name__, plan)
    if torch_dtype is not None:
        model.to(torch_dtype)  # floating tensors only; the int64 index buffers stay
    if device is not None:
        model.to(device)
    model.eval()
    return (model, plan.loading_info()) if output_loading_info else model


def _warn_initialised(name: str, plan: LoadPlan) -> None:
    missing = [k for k in plan.initialised if k in plan.missing]
    heads = [k for k in missing if _HEAD_KEYS.match(k)]
    others = [k for k in missing if not _HEAD_KEYS.match(k)]
    resized = [k for k in plan.initialised if k not in plan.missing]
    if others:
        warnings.warn(
            f"{name}: {len(missing)} tensors missing from the checkpoint were initialised at random (strict=False, as "
            f"transformers loads): {_format_keys(missing)}. Train them before use; without strict=False such a "
            "checkpoint is refused",
            UserWarning, stacklevel=4,
        )
    elif heads:
        warnings.warn(
            f"{name}: the checkpoint has no heads (a MaskFormerModel checkpoint?); {len(heads)} tensors were initialised "
            f"at random: {_format_keys(heads)}. Train them before use, or pass strict=True to refuse such checkpoints",
            UserWarning, stacklevel=4,
        )
    if resized:
        shapes = {k: (a, b) for k, a, b in plan.mismatched}
        shown = [f"{k}: checkpoint {tuple(shapes[k][0])} -> model {tuple(shapes[k][1])}" for k in resized]
        warnings.warn(
            f"{name}: {len(resized)} tensors had another shape in the checkpoint and were re-initialised at random "
            f"(ignore_mismatched_sizes=True): {_format_keys(shown)}. Train them before use (e.g. fine-tune the new head)",
            UserWarning, stacklevel=4,
        )


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
        save_file(state, path, metadata={"format": "pt"})
    else:
        torch.save(state, path)
