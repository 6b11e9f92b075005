"""The Fisher diagonal against direct per-sample gradient computations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchdkm.errors import ConfigError
from torchdkm.sensitivity import fisher_diagonal


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_empirical_matches_per_sample_gradients():
    net = _mlp()
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    params = {n: p.detach() for n, p in net.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(net, p, (xi[None],))
        return F.cross_entropy(out, yi[None], reduction="sum")

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    got = fisher_diagonal(net, [(x[:4], y[:4]), (x[4:], y[4:])], loss="empirical")
    assert got.samples == 9 and set(got.fisher) == {"0", "2"}
    for name in ("0", "2"):
        want = grads[f"{name}.weight"].square().mean(0)
        torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-7)
        assert got[name].dtype == torch.float32


def test_true_fisher_is_the_expectation_over_the_models_own_labels():
    # logistic regression: per-sample grad of CE wrt W is (p - e_y) xᵀ, so E_y[g²] = p_c (1 - p_c) x_j² exactly
    torch.manual_seed(1)
    lin = nn.Linear(4, 3)
    x = torch.randn(8, 4).repeat(400, 1)
    got = fisher_diagonal(lin, [x[i:i + 800] for i in range(0, 3200, 800)], seed=3)[""]
    p = lin(x[:8]).softmax(-1).detach()
    want = ((p * (1 - p))[:, :, None] * x[:8, None, :] ** 2).mean(0)
    torch.testing.assert_close(got, want, rtol=0.15, atol=1e-3)


def test_callable_loss_equals_empirical_and_flags_are_restored():
    net = _mlp()
    net.train()
    net[0].weight.requires_grad_(False)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    a = fisher_diagonal(net, [(x, y)], loss="empirical")
    b = fisher_diagonal(net, [(x, y)], loss=lambda out, s: F.cross_entropy(out, s[1], reduction="sum"))
    for n in a.fisher:
        torch.testing.assert_close(a[n], b[n])
    assert net.training and not net[0].weight.requires_grad and net[2].weight.requires_grad
    rows = a.summary()
    assert [r["layer"] for r in rows] == ["0", "2"] and abs(sum(r["share"] for r in rows) - 1) < 1e-6
    assert "2 layers, 5 samples" in a.table()


def test_tied_weights_counted_once_and_sequence_outputs():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(self.emb(ids))  # B × T × V

    lm = LM()
    s = fisher_diagonal(lm, [torch.randint(0, 11, (3, 7))])
    assert list(s.fisher) == ["emb"] and s.fisher["emb"].shape == (11, 4) and s.samples == 3
    assert float(s.fisher["emb"].sum()) > 0


def test_errors_name_what_was_given():
    with pytest.raises(ConfigError, match="loss='kl'"):
        fisher_diagonal(_mlp(), [torch.randn(2, 6)], loss="kl")
    with pytest.raises(ConfigError, match="needs \\(inputs, labels\\)"):
        fisher_diagonal(_mlp(), [torch.randn(2, 6)], loss="empirical")
    with pytest.raises(ConfigError, match="'1'"):
        fisher_diagonal(_mlp(), [torch.randn(2, 6)], layers=["1"])
