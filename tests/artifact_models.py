"""Small finalized models shared by the artifact / compact / export tests, all through the real prepare ->
finalize (k-means takes about a second per model; each is built once per session and copied)."""
import copy
import functools

import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.export.coreml import attach_metadata


class SmallCNN(nn.Module):
    """Conv2d, depthwise Conv2d, BatchNorm, Linear: (N, 1, 12, 12) -> (N, 10)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        x = torch.relu(self.pw(x)).mean((2, 3))
        return self.fc(x)


class TinyLM(nn.Module):
    """Embedding -> TransformerEncoderLayer -> Linear head tied to the embedding: (N, T) ids -> (N, T, vocab)."""

    def __init__(self, vocab=64, width=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.block = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.block(self.embed(ids)))))


def randomize_bn(model):
    """Non-trivial BatchNorm statistics, so eval outputs depend on them."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(7)
    return model


CNN_SPECS = {"conv": (5, 1), "dw": (2, 1), "pw": (3, 2), "fc": (7, 3)}  # name: (bits, dim); fc has a padded tail
LM_SPECS = {"embed": (4, 2), "block.self_attn.out_proj": (3, 1), "block.linear1": (3, 1), "block.linear2": (1, 1),
            "proj": (6, 5)}


def finalize_layers(model, specs, seed=0):
    """The real ``prepare`` -> ``finalize`` (k-means initialised, no training) of exactly the layers in ``specs``
    (name: (bits, dim)); every other layer stays as it is."""
    rules = {name: DKMConfig(bits=bits, dim=dim, min_numel=0, seed=seed) for name, (bits, dim) in specs.items()}
    torchdkm.prepare(model, DKMConfig(min_numel=1 << 62), rules)
    return torchdkm.finalize(model.eval())


@functools.lru_cache(maxsize=None)
def _finalized(kind, seed):
    torch.manual_seed(seed)
    if kind == "cnn":
        return finalize_layers(randomize_bn(SmallCNN()), CNN_SPECS, seed)
    return finalize_layers(TinyLM(), LM_SPECS, seed)


def finalized_cnn(seed=0):
    """A finalized SmallCNN (a fresh copy each call; k-means runs once per seed and session)."""
    return copy.deepcopy(_finalized("cnn", seed))


def finalized_lm(seed=0):
    """A finalized TinyLM (head tied to the embedding), a fresh copy each call."""
    return copy.deepcopy(_finalized("lm", seed))


def prepared_cnn(coreml=False):
    """A SmallCNN through the real prepare -> finalize (k-means initialised; training is not the point here)."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN())
    rules = {"conv": DKMConfig(bits=3), "dw": DKMConfig(bits=2), "pw": DKMConfig(bits=3, dim=2),
             "fc": DKMConfig(bits=2, dim=2 if coreml else 3)}  # 320 weights: dim 3 pads
    torchdkm.prepare(model, DKMConfig(bits=4), rules)
    torchdkm.finalize(model.eval())
    return attach_metadata(model) if coreml else model
