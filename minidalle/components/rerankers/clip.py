"""The ``clip`` reranker: cosine similarity of open_clip image and text embeddings.

The weights come from a local file only (``[reranker] weights``, a ``.safetensors`` or a
``.pt``/``.bin`` state dict read with ``weights_only=True``); nothing is downloaded. Without
open_clip the reranker is listed as unavailable; without the weights file building it is
an error that says so. ``model_config`` names a local open_clip model JSON (an architecture
open_clip does not ship; ``model`` is then its file stem).
"""
from __future__ import annotations

from pathlib import Path

import attrs

from minidalle.config import positive
from minidalle.errors import UnavailableComponentError

# open_clip's image normalisation (the OpenAI CLIP statistics)
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@attrs.define
class ClipRerankerConfig:
    model: str = "ViT-B-32"  # an open_clip architecture name
    weights: str = ""  # local weights file of that architecture
    model_config: str = ""  # optional local open_clip model JSON (registered before building)
    batch_size: int = attrs.field(default=16, validator=positive)


def load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}


class ClipReranker:
    def __init__(self, config: ClipRerankerConfig):
        import open_clip

        self.config = config
        path = Path(config.weights).expanduser()
        if not config.weights or not path.is_file():
            raise UnavailableComponentError(
                f"reranker 'clip' is unavailable: reranker.weights: "
                f"{'not set' if not config.weights else f'{path}: no such file'} (open_clip "
                f"weights for {config.model} are read from a local file only; nothing is downloaded)")
        if config.model_config:
            open_clip.add_model_config(str(Path(config.model_config).expanduser()))
        self.model = open_clip.create_model(config.model, pretrained=None)  # random init, no download
        try:
            self.model.load_state_dict(load_state_dict(path))
        except (RuntimeError, OSError, ValueError) as exc:
            from minidalle.errors import CheckpointError

            raise CheckpointError(f"{path}: not open_clip {config.model} weights: "
                                  f"{str(exc).strip().splitlines()[0][:200]}") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(config.model)
        size = self.model.visual.image_size
        self.size = size if isinstance(size, int) else tuple(size)[0]

    def score(self, captions, images):
        import torch
        import torch.nn.functional as F

        device = next(self.model.parameters()).device
        mean = torch.tensor(MEAN, device=device)[:, None, None]
        std = torch.tensor(STD, device=device)[:, None, None]
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.config.batch_size):
                x = images[i : i + self.config.batch_size].float().to(device)
                x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
                x = (x.clamp(0, 1) - mean) / std
                img = F.normalize(self.model.encode_image(x).float(), dim=-1)
                txt = self.tokenizer(list(captions[i : i + self.config.batch_size])).to(device)
                txt = F.normalize(self.model.encode_text(txt).float(), dim=-1)
                out.append((img * txt).sum(-1))
        return torch.cat(out).cpu()


def build(config: ClipRerankerConfig) -> ClipReranker:
    return ClipReranker(config)
