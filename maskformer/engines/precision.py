"""What ``dtype=`` of ``from_pretrained(..., engine=...)`` makes an engine compute in, on this CPU.

The exported graph is float32 and so are the engine's inputs and outputs; the precision an
engine computes in is a setting of its session or compilation, never a second export (one cached
export serves every precision). Each engine module declares ``precision_plan(precision,
cpu_lacks) -> (precision it runs, note or None)``, raising ``ValueError`` (naming the
alternative) for what it refuses (``cpu_lacks``: the flags this CPU lacks for that precision,
from ``maskformer.precision``, for its messages), and ``precision_facts()``, what ``maskformer
info`` adds about it. Kept out of ``registry``, the import graph's leaf that the export uses.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import torch

from ..precision import cpu_precisions
from .registry import ENGINES, engine_module, engine_unavailable, require

__all__ = ["PRECISIONS", "PrecisionWarning", "PrecisionPlan", "precision_name", "cpu_lacks", "precision_plan",
           "describe_precisions"]

# What ``dtype=`` may ask of an engine: its compute precision (inputs and outputs stay float32).
PRECISIONS = ("float32", "bfloat16", "float16")


class PrecisionWarning(UserWarning):
    """The engine runs another precision than the one asked for (float32 where the CPU has no
    native bf16); the message says why, naming the missing CPU flag."""


@dataclasses.dataclass(frozen=True)
class PrecisionPlan:
    """``requested``: the precision asked for; ``runs``: the one the engine computes in
    ("float32", "bfloat16", "float16"); ``note``: why they differ (None when they do not)."""

    engine: str
    requested: str
    runs: str
    note: Optional[str] = None


def precision_name(dtype) -> str:
    """``dtype=`` of ``from_pretrained`` (None, "auto", a torch dtype or its name) -> "float32",
    "bfloat16" or "float16"; ValueError for anything else."""
    if dtype is None or dtype == "auto":
        return "float32"  # the export's own precision (a checkpoint's stored dtype does not apply)
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    elif isinstance(dtype, str):
        name = dtype.replace("torch.", "")
    else:
        name = None
    if name not in PRECISIONS:
        raise ValueError(f"dtype={dtype!r}: an engine computes in one of {', '.join(PRECISIONS)} (its inputs and "
                         "outputs stay float32)")
    return name


def cpu_lacks(precision: str) -> Optional[str]:
    """None where this CPU computes ``precision`` natively, else the flags it needs, e.g. "needs
    avx512_bf16 or amx_bf16 (bf16 dot products (vdpbf16ps / AMX tiles))" (the first clause of
    ``maskformer.precision``'s reason; /proc/cpuinfo's flags)."""
    support = next(p for p in cpu_precisions() if p.precision == precision)
    return None if support.native else support.why_not.split(";")[0]


def precision_plan(engine: str, dtype) -> PrecisionPlan:
    """What ``engine`` computes in when ``dtype`` is asked for (see the module docstring); raises
    ``ValueError`` where the engine refuses it, naming what to use instead. Imports the engine."""
    requested = precision_name(dtype)
    if engine == "torch":
        return PrecisionPlan(engine, requested, requested)
    require(engine)
    runs, note = engine_module(engine).precision_plan(requested, cpu_lacks(requested))
    return PrecisionPlan(engine, requested, runs, note)


def describe_precisions() -> Dict[str, object]:
    """engine -> {precision: what ``dtype=`` of it does on this CPU, plus the engine's
    ``precision_facts()``}, for ``maskformer info``; a line instead for an engine that cannot run."""
    out: Dict[str, object] = {}
    for name in ENGINES[1:]:  # after torch
        if engine_unavailable(name):
            out[name] = "not usable (see engines)"
            continue
        try:
            report: Dict[str, str] = {}
            for precision in PRECISIONS:
                try:
                    plan = precision_plan(name, precision)
                except ValueError as exc:
                    report[precision] = f"refused: {exc}"
                    continue
                if plan.note is not None:
                    report[precision] = f"runs {plan.runs} instead, with a warning: {plan.note}"
                else:
                    report[precision] = f"runs {plan.runs}" + (" natively" if plan.runs != "float32" else "")
            report.update(engine_module(name).precision_facts())
        except Exception as exc:  # installed but broken: describe() says how
            report = f"unknown ({type(exc).__name__}: {exc})"
        out[name] = report
    return out
