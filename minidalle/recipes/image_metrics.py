"""Image-quality metrics of ``minidalle evaluate``: SSIM, FID and KID (torchmetrics) and the
CLIP score (open_clip), each from local weights only.

* :func:`inception_features` builds torchmetrics' Inception feature extractor from the file
  that ``evaluate.fid_weights`` names (torch-fidelity's ``pt_inception-2015-12-05`` weights
  as ``.pth`` or ``.safetensors``). The file is read as tensors only (safetensors, or
  ``torch.load(weights_only=True)``); nothing is ever downloaded.
* :func:`fid_kid` takes any feature extractor: an ``nn.Module`` mapping uint8 images
  ``[N, 3, H, W]`` to features ``[N, d]`` with an integer attribute ``num_features``.
  The tests pass a tiny one.
* :func:`clip_score` loads an open_clip architecture (``evaluate.clip_model``) with the
  weights of ``evaluate.clip_weights``, read the same way.

Each returns ``{"skipped": reason}`` rather than failing when what it needs is absent.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from minidalle.errors import ConfigError

FID_HOWTO = ("set evaluate.fid_weights = \"PATH\" to local Inception weights (torch-fidelity's "
             "pt_inception-2015-12-05-6726825d.pth, or a .safetensors copy); nothing is downloaded")
CLIP_HOWTO = ("set evaluate.clip_weights = \"PATH\" to local open_clip weights of "
              "evaluate.clip_model (.safetensors or .pt/.bin state dict) and install open_clip_torch")


def load_state_dict(path, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, never running code from it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise ConfigError(f"{key}: {path}: not a plain weights file ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{key}: {path}: expected a dict of tensors")
    return state


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM of float images in [0, 1] ``[N, 3, H, W]`` against ``reference``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    size = min(images.shape[-2:])
    kernel = min(11, size - (1 - size % 2))  # odd and no larger than the image
    return float(structural_similarity_index_measure(images.float(), reference.float(),
                                                     data_range=1.0, kernel_size=kernel))


def inception_features(path):
    """torchmetrics' Inception (2048 pool features) with the weights of ``path``."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    state = load_state_dict(path, "evaluate.fid_weights")
    with tempfile.TemporaryDirectory() as tmp:
        # torch-fidelity reads its weights with a full unpickler: hand it a file written
        # here from the tensors just read safely, never the user's file itself
        safe = Path(tmp) / "inception.pth"
        torch.save(state, safe)
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=str(safe))
        except RuntimeError as exc:
            raise ConfigError(f"evaluate.fid_weights: {path}: not Inception weights "
                              f"({str(exc).splitlines()[0]})") from None
    net.num_features = 2048
    return net


def fid_kid(real: torch.Tensor, fake: torch.Tensor, features, *, kid_subset_size: int = 50) -> dict:
    """FID and KID of uint8 images ``fake`` against ``real`` through ``features``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    import warnings

    n = min(len(real), len(fake))
    if n < 2:
        return {"skipped": f"needs at least 2 real and 2 generated images, got {len(real)} and {len(fake)}"}
    fid = FrechetInceptionDistance(feature=features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's note that it keeps every feature
        kid = KernelInceptionDistance(feature=features, subsets=10, subset_size=min(kid_subset_size, n))
    with torch.no_grad():
        for metric in (fid, kid):
            for i in range(0, len(real), 32):
                metric.update(real[i:i + 32], real=True)
            for i in range(0, len(fake), 32):
                metric.update(fake[i:i + 32], real=False)
        fid_value = float(fid.compute())
        kid_mean, kid_std = (float(v) for v in kid.compute())
    return {"fid": round(fid_value, 4), "kid_mean": round(kid_mean, 6), "kid_std": round(kid_std, 6),
            "real_images": len(real), "generated_images": len(fake),
            "kid_subset_size": min(kid_subset_size, n)}


def clip_score(captions: list[str], images: torch.Tensor, *, weights, model_name: str) -> dict:
    """Mean CLIP score, 100 * max(cos(text, image), 0), of uint8 ``images`` for ``captions``."""
    try:
        import open_clip
    except ImportError:
        return {"skipped": "needs the open_clip_torch package (pip install open_clip_torch); "
                           + CLIP_HOWTO}
    import torch.nn.functional as F

    if model_name not in open_clip.list_models():
        raise ConfigError(f"evaluate.clip_model: unknown open_clip architecture {model_name!r}")
    state = load_state_dict(weights, "evaluate.clip_weights")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError(f"evaluate.clip_weights: {weights}: does not fit {model_name} "
                          f"({str(exc).splitlines()[0]})") from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    from minidalle.images import to_pil

    scores = []
    with torch.no_grad():
        for i in range(0, len(captions), 32):
            pix = torch.stack([preprocess(to_pil(img)) for img in images[i:i + 32]])
            img = F.normalize(model.encode_image(pix).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(captions[i:i + 32])).float(), dim=-1)
            scores.append(100 * (img * txt).sum(-1).clamp(min=0))
    return {"clip_score": round(float(torch.cat(scores).mean()), 4), "images": len(captions),
            "model": model_name}
