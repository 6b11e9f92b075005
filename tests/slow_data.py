"""Test helper for test_compress_cli: the digits data, optionally slowed down so a run can be killed mid-epoch.

Used from a recipe as ``data: {name: "slow_data:slow_digits"}`` with ``tests/`` on PYTHONPATH. The delay comes
from environment variables: SLOW_DATA_SLEEP seconds per training sample (unset = no delay), starting after
SLOW_DATA_AFTER samples were served (default 0). A killed run and its resumed continuation see identical
data; only the first is slow, and only where the test wants to interrupt it.
"""
import os
import time

from torch.utils.data import Dataset

from torchdkm.app.zoo.data import load_digits


class _Slow(Dataset):
    def __init__(self, inner, sleep, after):
        self.inner, self.sleep, self.after, self.served = inner, sleep, after, 0

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        self.served += 1
        if self.sleep and self.served > self.after:
            time.sleep(self.sleep)
        return self.inner[i]


def slow_digits(test_fraction=0.25, seed=0):
    train, test = load_digits(test_fraction=test_fraction, seed=seed)
    env = os.environ
    return _Slow(train, float(env.get("SLOW_DATA_SLEEP", "0")), int(env.get("SLOW_DATA_AFTER", "0"))), test
