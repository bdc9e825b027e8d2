"""benchmarks/aot.py: every Triton kernel compiled for sm_80 and sm_90 without a GPU (the CI set),
with no compile error, no spill, and tensor cores in every fp16/bf16 (or TF32) attention and
einsum binary; and the rules and arithmetic the check relies on.

The check runs in a subprocess: it must compile (TRITON_INTERPRET unset), while tests/kernels'
conftest sets TRITON_INTERPRET=1 for the whole pytest process. ~1-2 minutes on 2 cores.
"""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_set_compiles_without_spills_and_with_tensor_cores(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASKFORMER_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot", "--quiet", "--json", str(tmp_path / "aot.json"),
                           "--out", str(tmp_path / "aot")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    report = json.loads((tmp_path / "aot.json").read_text()) if (tmp_path / "aot.json").exists() else None
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert report["failures"] == []
    assert (tmp_path / "aot.md").read_text().count("| ok |") == len(report["binaries"])
    seen = {(b["kernel"], b["arch"]) for b in report["binaries"]}
    assert seen == {(k, a) for k in aot.kernels() for a in ("sm_80", "sm_90")}
    for b in report["binaries"]:
        assert "error" not in b, b
        assert b["spill_store_bytes"] == 0 and b["spill_load_bytes"] == 0, b
        assert 0 < b["registers"] <= 255 and b["occupancy"] > 0, b
        assert b["fp_fusion"] == (b["kernel"] != "upsample_argmax"), b  # set explicitly by each launch
        if b["tensor_cores_required"]:
            assert b["wgmma"] + b["mma_sync"] > 0, b
            assert (b["hgmma"] if b["arch"] == "sm_90" and b["wgmma"] else b["hmma"]) > 0, b
    # every dtype of the attention and the einsums, both TF32 settings for fp32, both shifts
    launches = report["launches"]
    for kernel in ("window_attention", "mask_einsum", "mask2former_semantic"):
        assert {l["dtype"] for l in launches if l["kernel"] == kernel} == {"fp32", "fp16", "bf16"}
        assert {l.get("tf32") for l in launches if l["kernel"] == kernel and l["dtype"] == "fp32"} == {False, True}
    assert {l["shift"] for l in launches if l["kernel"] == "window_attention"} == {0, 3, 6}
    # the deformable attention at Mask2Former's real shape, every dtype
    msda = [l for l in launches if l["kernel"] == "ms_deform_attn"]
    assert {l["dtype"] for l in msda} == {"fp32", "fp16", "bf16"}
    assert {(l["levels"], l["heads"], l["D"], l["P"]) for l in msda} == {("16x16+32x32+64x64", 8, 32, 4)}
    # exact fp32 runs on FFMA, TF32 and half precision on the tensor cores
    by_binary = {(b["arch"], b["binary"]): b for b in report["binaries"]}
    for l in launches:
        if l["kernel"] in ("window_attention", "mask_einsum", "mask2former_semantic") and l["dtype"] == "fp32" \
                and not l["tf32"]:
            b = by_binary[(l["arch"], l["binary"])]
            assert b["wgmma"] + b["mma_sync"] == 0 and b["ffma"] > 0, b


def test_rules():
    ok = dict(spill_store_bytes=0, spill_load_bytes=0, registers=96, wgmma=3, mma_sync=0)
    assert aot.rule_failures(ok, tensor_cores=True) == []
    assert aot.rule_failures(dict(ok, wgmma=0), tensor_cores=False) == []
    assert "no tensor-core instruction" in aot.rule_failures(dict(ok, wgmma=0), tensor_cores=True)[0]
    assert "spills 8 B stores / 4 B loads" in aot.rule_failures(dict(ok, spill_store_bytes=8, spill_load_bytes=4), False)[0]
    assert aot.rule_failures(dict(error="ptxas died"), tensor_cores=False) == ["compile error: ptxas died"]


def test_occupancy_matches_the_cuda_calculator():
    # 255 registers x 4 warps: 8 KiB per warp, 2 warps per 16K sub-partition -> 8 warps = 2 blocks
    assert aot.occupancy(90, 255, 0, 4) == dict(blocks_per_sm=2, warps_per_sm=8, occupancy=0.125, limited_by="registers")
    # 128 registers: 4 KiB per warp -> 16 warps = 4 blocks of 4
    assert aot.occupancy(80, 128, 16384, 4)["warps_per_sm"] == 16
    # 32 registers: the 64-warp limit; 100 KiB of shared memory: 2 blocks on H100, 1 on A100
    assert aot.occupancy(90, 32, 0, 4)["occupancy"] == 1.0
    assert aot.occupancy(90, 32, 100 * 1024, 4)["blocks_per_sm"] == 2
    assert aot.occupancy(80, 32, 100 * 1024, 4)["blocks_per_sm"] == 1
    assert aot.occupancy(80, 32, 200 * 1024, 4)["blocks_per_sm"] == 0  # more than a block may have


def test_loop_profile_counts_loops_and_skippable_blocks():
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        "        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;",
        "        /*0020*/              @!P0 BRA `(.L_x_1) ;",
        "        /*0030*/                   MUFU.EX2 R2, R3 ;",
        "        /*0040*/                   LDG.E R5, desc[UR4][R6.64] ;",
        ".L_x_1:",
        "        /*0050*/              @P1 BRA `(.L_x_0) ;",
        "        /*0060*/                   EXIT ;",
        ".L_x_2:",
        "        /*0070*/                   BRA `(.L_x_2);",
    ])
    outside, loop = aot.loop_profile(sass)
    assert outside == dict(depth=0, own=2, skippable=0, global_loads=0, mma=0, mufu=0)
    assert loop == dict(depth=1, own=5, skippable=2, global_loads=1, mma=1, mufu=1)


def test_plans_cover_every_kernel_and_full_is_a_superset():
    """The launches come from the op registry: every op with a Triton kernel declares them."""
    from maskformer.kernels import registry

    ci, full = aot.launches(full=False), aot.launches(full=True)
    assert {l.kernel for l in ci} == {l.kernel for l in full} == set(aot.kernels())
    assert set(aot.kernels()) == {op.name for op in registry.ops() if op.aot_launches}
    with_triton = {op.name for op in registry.ops() if op.impl("triton")}
    assert with_triton - set(aot.kernels()) == {"semantic_segmentation"}  # mask_einsum's and upsample_argmax's kernels
    labels = {(l.kernel, l.label) for l in full}
    assert len(full) > 10 * len(ci)
    # the CI set's window-attention and einsum launches are real model launches of the full set
    missing = [l.label for l in ci if l.kernel != "upsample_argmax" and (l.kernel, l.label) not in labels]
    assert missing == []
