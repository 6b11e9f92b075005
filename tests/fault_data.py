"""Test helper for test_faults: a small slice of the digits data that injects one fault into a run.

Used from a recipe as ``data: {name: "fault_data:digits"}`` with ``tests/`` on PYTHONPATH. Environment variables
choose the fault: FAULT = kill | stop | nan | fill, on the process of rank FAULT_RANK (default 1; a run without
torchrun is rank 0), when it serves its FAULT_AT-th training sample, only in torchrun's first attempt (a restarted
worker runs clean):
- kill: SIGKILL itself (a preempted or crashed worker), after creating the file FAULT_MARK if given;
- stop: SIGSTOP itself (a hung worker), after writing its pid to FAULT_PID;
- nan: that sample's input is NaN (a diverging rank);
- fill: a file FAULT_FILL fills its disk, leaving FAULT_LEAVE bytes (default 0) free.
"""
import os
import signal

import torch
from torch.utils.data import Dataset, TensorDataset

from torchdkm.app.zoo.data import load_digits


class _Faulty(Dataset):
    def __init__(self, inner):
        self.inner, self.served = inner, 0
        env = os.environ
        first = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        mine = env.get("RANK", "0") == env.get("FAULT_RANK", "1" if "RANK" in env else "0")
        self.fault = env.get("FAULT") if first and mine else None
        self.at = int(env.get("FAULT_AT", "0"))

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.served += 1
        x, y = self.inner[i]
        if self.fault and self.served == self.at:
            if self.fault == "kill":
                if os.environ.get("FAULT_MARK"):
                    open(os.environ["FAULT_MARK"], "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "stop":
                with open(os.environ["FAULT_PID"], "w") as f:
                    f.write(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGSTOP)
            elif self.fault == "nan":
                x = x * float("nan")
            elif self.fault == "fill":
                _fill(os.environ["FAULT_FILL"], int(os.environ.get("FAULT_LEAVE", "0")))
        return x, y


def _fill(path, leave):
    """Write zeros to ``path`` until its filesystem has only ``leave`` bytes free (or is full)."""
    with open(path, "wb") as f:
        try:
            while True:
                st = os.statvfs(os.path.dirname(path))
                free = st.f_bavail * st.f_frsize - leave
                if free <= 0:
                    break
                f.write(b"\0" * min(free, 1 << 16))
                f.flush()
        except OSError:
            pass


def digits(n_train=512, n_test=128):
    """The first ``n_train`` digits training samples (a few steps per epoch) and ``n_test`` test samples, read
    from the file FAULT_DIGITS when it exists (written by :func:`cache`: no scikit-learn import per process)."""
    cached = os.environ.get("FAULT_DIGITS")
    if cached and os.path.exists(cached):
        tensors = torch.load(cached)
    else:
        tensors = [d.tensors for d in load_digits(test_fraction=0.25, seed=0)]
    (xs, ys), (xt, yt) = tensors
    return _Faulty(TensorDataset(xs[:n_train], ys[:n_train])), TensorDataset(xt[:n_test], yt[:n_test])


def cache(path):
    """Write the digits tensors to ``path`` for FAULT_DIGITS."""
    torch.save([d.tensors for d in load_digits(test_fraction=0.25, seed=0)], path)
