import pytest
import torch

import torchdkm


def test_distillation_loss_is_the_scaled_kl_of_softened_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    T = 3.0
    p, q = torch.softmax(s / T, 1), torch.softmax(t / T, 1)
    want = (q * (q.log() - p.log())).sum(1).mean() * T * T
    got = torchdkm.distillation_loss(s, t, temperature=T)
    assert torch.allclose(got.double(), want, rtol=1e-5)
    assert torchdkm.distillation_loss(t, t, temperature=T).abs() < 1e-6


def test_distillation_loss_averages_tokens_and_leaves_the_teacher_alone():
    s = torch.randn(2, 7, 11, requires_grad=True)
    t = torch.randn(2, 7, 11, requires_grad=True)
    loss = torchdkm.distillation_loss(s, t)
    flat = torchdkm.distillation_loss(s.reshape(14, 11), t.reshape(14, 11))
    assert torch.allclose(loss, flat)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize("shape_t, temp", [((4, 6), 1.0), ((4, 5), 0.0), ((4, 5), -1.0)])
def test_distillation_loss_rejects_bad_input(shape_t, temp):
    with pytest.raises(torchdkm.ConfigError, match="distillation_loss"):
        torchdkm.distillation_loss(torch.randn(4, 5), torch.randn(*shape_t), temperature=temp)
