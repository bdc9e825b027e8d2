"""Threads: lazy loading of the C++ extension, and backend choices that stay in their own thread.

The first-use races only exist in a fresh process (afterwards everything is loaded), so those
tests run in a subprocess and line the threads up on a barrier so that they really race.
"""
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from maskformer import dispatch

THREADS = 8


def run_fresh(code: str):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


# ------------------------------------------------------------------------------------------------
# 13. the first concurrent calls in a fresh process
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("disable_cpp", ["0", "1"], ids=["extension", "extension disabled"])
def test_first_concurrent_calls_in_a_fresh_process(disable_cpp):
    """Every thread gets the same, complete answer whether the extension loads or not (before the
    fix, 3 of 4 threads raised "sequence item 0: expected str instance, NoneType found")."""
    out = run_fresh(f"""
        import os, threading, traceback
        os.environ["MASKFORMER_DISABLE_CPP"] = "{disable_cpp}"
        import torch
        from maskformer import dispatch

        torch.manual_seed(0)
        cls, masks = torch.randn(2, 5, 4), torch.randn(2, 5, 16, 16)
        barrier = threading.Barrier({THREADS})
        results, errors = [None] * {THREADS}, []

        def work(i):
            barrier.wait()
            try:
                results[i] = dispatch.semantic_segmentation(cls, masks, [(32, 40), (20, 24)])
            except Exception:
                errors.append(traceback.format_exc())

        threads = [threading.Thread(target=work, args=(i,)) for i in range({THREADS})]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        ref = dispatch.semantic_segmentation(cls, masks, [(32, 40), (20, 24)])
        assert all(torch.equal(a, b) for r in results for a, b in zip(r, ref))
        print(dispatch.last_dispatch("semantic_segmentation").backend)
    """)
    assert out.strip() in (("reference",) if disable_cpp == "1" else ("cpp", "reference"))


def test_concurrent_first_load_reports_one_consistent_state():
    out = run_fresh(f"""
        import threading
        from maskformer import _ext

        barrier = threading.Barrier({THREADS})
        seen = []

        def work():
            barrier.wait()
            seen.append((_ext.load_cpp() is not None, _ext.cpp_import_error(), tuple(_ext.cpp_missing_ops("mask_einsum"))))

        threads = [threading.Thread(target=work) for _ in range({THREADS})]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(seen)) == 1, set(seen)
        loaded, error, missing = seen[0]
        assert loaded == (error is None), seen[0]
        assert all(isinstance(m, str) for m in missing), seen[0]
        print("ok")
    """)
    assert out.strip() == "ok"


# ------------------------------------------------------------------------------------------------
# 14. backend overrides are context-local; last_dispatch is per thread; set_backend is process-wide
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_backend(None)
    yield
    dispatch.set_backend(None)


def test_with_backend_stays_in_its_thread():
    inside, started, release = [], threading.Event(), threading.Event()

    def forcing():
        with dispatch.backend("triton"):
            started.set()
            release.wait(10)
            inside.append(dispatch.get_backend())

    t = threading.Thread(target=forcing)
    t.start()
    started.wait(10)
    try:
        assert dispatch.get_backend() == "auto"  # the other thread's block does not reach here
        cls, masks = torch.randn(1, 3, 4), torch.randn(1, 3, 8, 8)
        dispatch.semantic_segmentation(cls, masks)  # would raise under a forced triton (no TRITON_INTERPRET)
    finally:
        release.set()
        t.join()
    assert inside == ["triton"]
    assert dispatch.get_backend() == "auto"


def test_interleaved_blocks_restore_their_own_backend():
    """Two threads enter and leave their blocks in crossed order; each sees and restores its own."""
    steps = [threading.Event() for _ in range(4)]
    seen = {}

    def first():
        with dispatch.backend("reference"):
            steps[0].set()
            steps[1].wait(10)
            seen["first inside"] = dispatch.get_backend()
        seen["first after"] = dispatch.get_backend()
        steps[2].set()

    def second():
        steps[0].wait(10)
        with dispatch.backend("cpp"):
            steps[1].set()
            steps[2].wait(10)  # the first thread has left its block meanwhile
            seen["second inside"] = dispatch.get_backend()
        seen["second after"] = dispatch.get_backend()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"first inside": "reference", "first after": "auto", "second inside": "cpp", "second after": "auto"}
    assert dispatch.get_backend() == "auto"


def test_nested_blocks_and_the_process_wide_setter():
    dispatch.set_backend("reference")
    with dispatch.backend("cpp"):
        with dispatch.backend("auto"):
            assert dispatch.get_backend() == "auto"
        assert dispatch.get_backend() == "cpp"
    assert dispatch.get_backend() == "reference"
    seen = []
    t = threading.Thread(target=lambda: seen.append(dispatch.get_backend()))
    t.start()
    t.join()
    assert seen == ["reference"]  # set_backend reaches every thread (and says so)
    assert "every thread" in dispatch.set_backend.__doc__


def test_last_dispatch_is_per_thread():
    cls, masks = torch.randn(1, 3, 4), torch.randn(1, 3, 8, 8)
    my_einsum = dispatch.last_dispatch("mask_einsum")  # from earlier tests in this thread, if any
    with dispatch.backend("reference"):
        dispatch.semantic_segmentation(cls, masks)
    mine = dispatch.last_dispatch()
    barrier = threading.Barrier(2)
    other = []

    def work():
        assert dispatch.last_dispatch() is None  # nothing ran in this thread yet
        with dispatch.backend("reference"):
            dispatch.mask_einsum(cls, masks)
        other.append(dispatch.last_dispatch())
        barrier.wait(10)

    t = threading.Thread(target=work)
    t.start()
    barrier.wait(10)
    t.join()
    assert other[0].op == "mask_einsum"
    assert dispatch.last_dispatch() is mine and mine.op == "semantic_segmentation"
    assert dispatch.last_dispatch("mask_einsum") is my_einsum  # the other thread's call is not seen here
    assert dispatch.last_dispatch_reason == str(mine)


def test_asyncio_tasks_keep_their_own_backend():
    import asyncio

    async def task(name, gate_in, gate_out, seen):
        with dispatch.backend(name):
            gate_in.set()
            await gate_out.wait()
            seen[name] = dispatch.get_backend()

    async def main():
        a_in, b_in, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
        seen = {}
        ta = asyncio.create_task(task("reference", a_in, go, seen))
        tb = asyncio.create_task(task("cpp", b_in, go, seen))
        await a_in.wait()
        await b_in.wait()  # both blocks are open, interleaved on one thread
        go.set()
        await asyncio.gather(ta, tb)
        return seen, dispatch.get_backend()

    seen, after = asyncio.run(main())
    assert seen == {"reference": "reference", "cpp": "cpp"} and after == "auto"
