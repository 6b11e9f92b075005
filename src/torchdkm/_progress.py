"""Progress a log file can show: plain lines instead of progress bars when stdout is not a terminal.

    progress = ProgressLog(enabled=is_rank_0, every_s=30)
    with progress.phase("k-means init"):            # "k-means init ..." then "k-means init: finished in 41.2 s"
        initialize(model)
    progress.begin("DKM", total=24, per_step=4, unit="samples")
    for ...:
        progress.step(loss)                         # every every_steps steps or every_s seconds, first come:
    # DKM step 12/24: loss 0.2712, 0.20 samples/s, ETA 4m10s

Phase announcements are printed on a terminal too (through tqdm.write, so the bars stay intact); step lines only
when stdout is not a terminal, where the bars are off, and there a phase that runs longer than every_s also says
"still running" after every_s, 2 every_s, 4 every_s, ... seconds (a slow run is told from a dead one, and a long
phase adds only a few lines). ``enabled=False`` (every rank but 0) prints nothing.
Used by ``torchdkm compress`` (torchdkm.app.job) and the Trainer callback (torchdkm.integrations.hf_trainer).
"""
from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import Optional

__all__ = ["ProgressLog", "DEFAULT_EVERY_S"]

DEFAULT_EVERY_S = 30.0
QUIET_UNDER_S = 1.0  # a recurring phase that took less is not announced again


class ProgressLog:
    """Phase announcements with their duration, and throttled step lines with loss, throughput and ETA."""

    def __init__(self, enabled: bool = True, every_steps: int = 0, every_s: float = DEFAULT_EVERY_S,
                 lines: Optional[bool] = None, clock=time.perf_counter):
        self.enabled = enabled
        self.every_steps, self.every_s = every_steps, every_s
        # step lines replace the bars: only where there are none (stdout redirected to a file or a pipe)
        self.lines = enabled and (not sys.stdout.isatty() if lines is None else lines)
        self.clock = clock
        self.last_s: dict = {}  # kind of a recurring phase -> seconds its last one took
        self.begin("", 0)

    def say(self, line: str) -> None:
        """One line, flushed at once (a log file shows it while the run goes on); nothing when disabled."""
        if self.enabled:
            from tqdm.auto import tqdm

            tqdm.write(line)
            sys.stdout.flush()

    @contextmanager
    def phase(self, what: str, kind: Optional[str] = None):
        """Announce a set-up phase, then say how long it took (also when it fails, so the log shows where).
        A phase that recurs (every epoch's evaluation) names its ``kind``: once one of that kind took under
        QUIET_UNDER_S seconds, the next ones pass silently."""
        loud = kind is None or self.last_s.get(kind, QUIET_UNDER_S) >= QUIET_UNDER_S
        if loud:
            self.say(f"{what} ...")
        t0 = self.clock()
        ok = False
        stop = self._heartbeat(what, t0) if loud else None
        try:
            yield
            ok = True
        finally:
            if stop is not None:
                stop()
            took = self.clock() - t0
            if kind is not None:
                self.last_s[kind] = took
            if loud or not ok:
                self.say(f"{what}: {'finished in' if ok else 'stopped after'} {_duration(took)}")

    def _heartbeat(self, what: str, t0: float):
        """In log mode, a daemon thread that says "still running" after every_s, 2 every_s, 4 every_s, ... seconds
        until the returned function stops it; None when there is nothing to do."""
        if not self.lines or self.every_s <= 0:
            return None
        done = threading.Event()

        def beat():
            wait = self.every_s
            while not done.wait(wait):
                self.say(f"{what}: still running, {_duration(self.clock() - t0)} so far")
                wait *= 2  # the intervals double: lines at 1, 2, 4, 8 ... x every_s

        thread = threading.Thread(target=beat, name="torchdkm-progress", daemon=True)
        thread.start()

        def stop():
            done.set()
            thread.join()
        return stop

    def begin(self, label: str, total: int, done: int = 0, per_step: int = 1, unit: str = "samples",
              note: str = "") -> None:
        """Start a stepped phase of ``total`` steps, ``done`` of them already (a resumed run); each step
        processes ``per_step`` ``unit`` (samples or tokens), for the throughput. ``note``: appended to the
        step number, e.g. the epoch."""
        self.label, self.total, self.done, self.per_step, self.unit, self.note = label, total, done, per_step, unit, note
        self.start_done, self.t_start = done, self.clock()
        self.last_done, self.t_last = done, self.t_start
        self.loss_sum, self.loss_n = 0.0, 0

    def step(self, loss=None, note: Optional[str] = None) -> bool:
        """One step done (``loss``: a float or a tensor, read only when a line is due). Returns whether a
        line was printed."""
        self.done += 1
        if not self.lines:
            return False
        if note is not None:
            self.note = note
        if loss is not None:
            self.loss_sum = self.loss_sum + loss.detach() if hasattr(loss, "detach") else self.loss_sum + loss
            self.loss_n += 1
        if not self.due():
            return False
        self.say(self.line())
        self.last_done, self.t_last = self.done, self.clock()
        self.loss_sum, self.loss_n = 0.0, 0
        return True

    def due(self) -> bool:
        """every_steps steps or every_s seconds since the last line, whichever comes first (0 turns one off)."""
        by_steps = self.every_steps > 0 and self.done - self.last_done >= self.every_steps
        by_time = self.every_s > 0 and self.clock() - self.t_last >= self.every_s
        return by_steps or by_time

    def rate(self) -> float:
        """Steps per second in this session of the phase (0 before the first step)."""
        elapsed = self.clock() - self.t_start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """'DKM step 12/24 (epoch 1/1): loss 0.2712 (mean of the last 2 steps), 0.20 samples/s, ETA 4m10s'."""
        rate = self.rate()
        eta = _duration((self.total - self.done) / rate) if rate > 0 else "?"
        text = f"{self.label} step {self.done}/{self.total}"
        text += f" ({self.note})" if self.note else ""
        parts = []
        if self.loss_n:
            parts.append(f"loss {float(self.loss_sum) / self.loss_n:.4f}")
        parts.append(f"{_throughput(rate * self.per_step)} {self.unit}/s")
        parts.append(f"ETA {eta}")
        return f"{text}: {', '.join(parts)}"


def _throughput(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def _duration(s: float) -> str:
    """'4.2 s', '4m10s', '1h02m'."""
    if s < 60:
        return f"{s:.1f} s"
    s = int(round(s))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
