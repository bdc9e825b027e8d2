"""The device check every fast op runs at its boundary.

A registered op (``torch.ops.maskformer.*``) called with tensors on different devices dispatches on
the highest-priority one: a meta tensor beside CPU tensors selects the op's fake (meta) kernel,
which returns the CPU output it was given, or allocates one, without writing it - uninitialised
memory, silently. And torch's own ops do not all refuse a mix either (``torch.einsum`` of a meta and
a CPU tensor returns a CPU tensor). So every public entry (``maskformer.dispatch`` and the
kernel-level functions of ``maskformer.kernels``) and every fake kernel checks that its tensors
share one device, and says which is where. Tensors that are all on the meta device pass: that is
shape propagation (the fake kernels, and the reference ops, return meta results); the fast
kernels' ``*not_supported_reasons`` refuse meta tensors where they would have to compute.
"""
from typing import Dict

import torch

__all__ = ["check_same_device", "devices_of"]


def devices_of(**tensors) -> Dict[str, torch.device]:
    """name -> device of every tensor among ``tensors``; None values are skipped, a list or tuple
    expands to ``name[i]`` entries."""
    found = {}
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            found[name] = value.device
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, torch.Tensor):
                    found[f"{name}[{i}]"] = item.device
    return found


def check_same_device(op: str, **tensors) -> None:
    """Raise ValueError when the named tensors are not all on one device, e.g.
    ``upsample_argmax: tensors on different devices: scores on meta, out on cpu``."""
    found = devices_of(**tensors)
    if len(set(found.values())) > 1:
        where = ", ".join(f"{name} on {device}" for name, device in found.items())
        raise ValueError(f"{op}: tensors on different devices: {where}; move them to one device")
