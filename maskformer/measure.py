"""Measuring on a shared machine: each row in its own process, rows timed interleaved, paired
ratios, peak memory.

The harness under ``maskformer bench`` (maskformer/bench.py says *what* a row is; this module
how rows are run and compared); ``measure_peak_extra`` is also used by the post-processing
benchmarks in ``benchmarks/``.

* A row's process (``serve``) loads and warms up, then answers one line per command on stdin:
  ``RUN`` (one timed iteration), ``MEM`` (peak extra memory of one iteration), ``EXIT``; each
  answer is one ``BENCH {json}`` line on stdout. ``RowProcess`` is the parent's handle, with a
  time limit per answer.
* ``interleave`` times the rows round after round, one iteration each per round, the order
  rotating by one each round, so that a change of machine load (this project's 2-core machine is
  shared by several engineers: 1-minute load 2-9) hits every row alike; the 1-minute load average
  is recorded per round.
* ``paired_ratios``: per pair of rows, the median of the per-round time ratios, which load drift
  disturbs far less than a ratio of medians.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .reporting import loadavg

__all__ = ["measure_peak_extra", "reset_peak_rss", "peak_rss_kib", "proc_status_kib", "serve", "RowProcess",
           "interleave", "paired_ratios"]


# ---------------------------------------------------------------------------------------------
# peak memory
def proc_status_kib(field: str) -> int:
    """A KiB field (VmRSS, VmHWM, ...) of /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux: write 5 to clear_refs) and
    return the current RSS in KiB; extra memory since then is ``peak_rss_kib() -`` this."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return proc_status_kib("VmRSS")
    except OSError:  # not Linux, or not allowed: fall back to the lifetime peak (an upper bound)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kib() -> int:
    try:
        return proc_status_kib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure_peak_extra(fn, *args, device: str = "cpu"):
    """Run ``fn(*args)`` once -> (result, peak extra MiB during the call, method).

    CUDA: the allocator's peak over what was allocated before. CPU: peak resident memory during
    the call over the resident memory just before it (VmHWM after clear_refs). Run it in a fresh
    process after a warm-up call, so that lazy initialisation is not counted.
    """
    import torch  # only where memory is measured: the rest of this module is processes and pipes

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn(*args)
        torch.cuda.synchronize()
        return result, (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda allocator"
    base = reset_peak_rss()
    result = fn(*args)
    return result, max(0, peak_rss_kib() - base) / 1024, "VmHWM - VmRSS (clear_refs)"


# ---------------------------------------------------------------------------------------------
# a row's process and the parent's handle on it
def _say(message: Dict) -> None:
    print("BENCH " + json.dumps(message), flush=True)


def serve(step: Callable[[], float], ready: Dict, device: str = "cpu") -> int:
    """A row's process, after loading and warming up: say ``ready`` (a JSON-ready dict), then
    answer RUN with ``{"total_ms", "forward_ms"}`` (one call of ``step``, which returns the
    seconds of its forward part), MEM with ``{"peak_mem_mb"}`` and stop at EXIT (or end of input)."""
    _say(dict(ready, ready=True))
    for line in sys.stdin:
        command = line.strip()
        if command == "RUN":
            start = time.perf_counter()
            forward = step()
            _say({"total_ms": (time.perf_counter() - start) * 1e3, "forward_ms": forward * 1e3})
        elif command == "MEM":
            _, peak, _ = measure_peak_extra(step, device=device)
            _say({"peak_mem_mb": peak})
        elif command == "EXIT":
            break
    return 0


class RowProcess:
    """The parent's handle on one row's process, started as ``argv`` (its stderr goes to
    ``log_path``). ``timeout``: seconds an answer may take (the loading and warm-up, or one
    iteration); past it the process is killed and the row fails (``ask`` raises RuntimeError;
    ``error`` and ``error_log``, the log's last 25 lines, say why)."""

    def __init__(self, argv: Sequence[str], log_path: str, timeout: Optional[float] = None, cwd: Optional[str] = None,
                 spec: Optional[Dict] = None):
        self.spec = spec or {}
        self.timeout = timeout
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=cwd)
        self.error = None
        self.error_log = None
        self._timed_out = False

    def _kill_on_timeout(self):
        self._timed_out = True
        self.proc.kill()

    def ask(self, command: Optional[str]) -> Dict:
        """Send ``command`` (None: only wait for the next answer, e.g. READY) -> the answer."""
        if self.error:
            raise RuntimeError(self.error)
        timer = threading.Timer(self.timeout, self._kill_on_timeout) if self.timeout else None
        try:
            if timer:
                timer.start()
            if command:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith("BENCH "):
                    return json.loads(line[6:])
        except OSError:  # the process died while we wrote to it
            pass
        finally:
            if timer:
                timer.cancel()
        self.proc.wait()
        self.log.flush()
        with open(self.log.name) as f:
            lines = [l for l in f.read().strip().splitlines() if l.strip()] or ["no output"]
        # the log's end too: a row that fails on a lent GPU must say where (the next chance to look
        # may be weeks away)
        self.error_log = "\n".join(lines[-25:])
        self.error = (f"timed out after {self.timeout:g} s (--row-timeout)" if self._timed_out
                      else f"exit {self.proc.returncode}: {lines[-1]}")
        raise RuntimeError(self.error)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("EXIT\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------------------------------
# interleaved timing
def interleave(rows: Dict[str, RowProcess], keys: List[str], rounds: int, *, pause: float = 0.2,
               failed: Optional[Dict[str, str]] = None, deadline: Optional[float] = None,
               log=lambda text: print(text, file=sys.stderr, flush=True)) -> Tuple[Dict, Dict, List[Dict]]:
    """Time ``keys`` (rows already loaded and warmed up) for ``rounds`` rounds, one RUN each per
    round, the order rotating by one each round.

    pause: seconds before each iteration (the previous row's spinning threads go to sleep).
    failed: {key: why}, updated as rows fail (a failed row is skipped from then on). deadline: a
    ``time.monotonic()`` after which no further round starts (the first always runs).
    -> ({key: [total ms per round]}, {key: [forward ms per round]}, per round {round, loadavg, order}).
    """
    failed = {} if failed is None else failed
    totals: Dict[str, List[float]] = {k: [] for k in keys}
    forwards: Dict[str, List[float]] = {k: [] for k in keys}
    done = []
    for r in range(rounds):
        if r and deadline is not None and time.monotonic() > deadline:
            log(f"  --max-seconds spent: {r} of {rounds} rounds")
            break
        order = keys[r % len(keys):] + keys[:r % len(keys)] if keys else []
        done.append({"round": r + 1, "loadavg": loadavg(), "order": order})
        for key in order:
            if key in failed:
                continue
            time.sleep(pause)
            try:
                result = rows[key].ask("RUN")
            except RuntimeError as exc:
                failed[key] = str(exc)
                continue
            totals[key].append(result["total_ms"])
            forwards[key].append(result["forward_ms"])
        log(f"  round {r + 1}/{rounds} done (load average {done[-1]['loadavg']})")
    return totals, forwards, done


def paired_ratios(times: Dict[str, List[float]], pairs) -> List[Dict]:
    """Per pair (a, b): the per-round ratios times[b][r] / times[a][r] (> 1: a is faster), their
    median, min and max."""
    out = []
    for a, b in pairs:
        ta, tb = times.get(a), times.get(b)
        if not ta or not tb:
            continue
        ratios = [y / x for x, y in zip(ta, tb) if x and y]
        if ratios:
            out.append({"faster": a, "slower": b, "median": round(float(np.median(ratios)), 3),
                        "min": round(min(ratios), 3), "max": round(max(ratios), 3), "rounds": len(ratios)})
    return out
