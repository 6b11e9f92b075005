"""Small finalized models shared by the artifact / compact / export tests."""
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.export.coreml import attach_metadata
from torchdkm.functional import from_vectors, nearest_centroid, to_vectors
from torchdkm.layers import FinalizedLayer


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


@torch.no_grad()
def quick_finalize(model, specs, seed=0):
    """What ``finalize`` leaves (weight = LUT rows, ``_torchdkm`` record), with LUT rows drawn from the weight
    itself instead of trained: k-means initialisation would dominate these tests' runtime."""
    g = torch.Generator().manual_seed(seed)
    for name, (bits, dim) in specs.items():
        module = model.get_submodule(name)
        w = module.weight
        vecs, pad = to_vectors(w, dim)
        lut = vecs[torch.randint(0, vecs.shape[0], (2**bits,), generator=g)].clone()
        w.copy_(from_vectors(lut[nearest_centroid(vecs, lut)], w.shape, pad))
        module._torchdkm = FinalizedLayer(bits, dim, pad, lut)
    return model.eval()


def finalized_cnn(seed=0):
    torch.manual_seed(seed)
    return quick_finalize(randomize_bn(SmallCNN()), CNN_SPECS, seed)


def finalized_lm(seed=0):
    torch.manual_seed(seed)
    return quick_finalize(TinyLM(), LM_SPECS, seed)


def prepared_cnn(coreml=False):
    """A SmallCNN through the real prepare -> finalize (k-means initialised; training is not the point here)."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN())
    rules = {"conv": DKMConfig(bits=3), "dw": DKMConfig(bits=2), "pw": DKMConfig(bits=3, dim=2),
             "fc": DKMConfig(bits=2, dim=2 if coreml else 3)}  # 320 weights: dim 3 pads
    torchdkm.prepare(model, DKMConfig(bits=4), rules)
    torchdkm.finalize(model.eval())
    return attach_metadata(model) if coreml else model
