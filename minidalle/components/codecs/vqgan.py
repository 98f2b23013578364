"""The ``vqgan`` codec: taming-transformers VQGAN checkpoints (``.ckpt`` + ``.yaml``).

The network is assembled from taming's building blocks only (``Encoder``, ``Decoder``,
``VectorQuantizer`` and two 1x1 convs) under the exact parameter names of taming's
``VQModel``, so the public checkpoints (e.g. ImageNet f16-1024: ``checkpoints/last.ckpt`` +
``configs/model.yaml``) and the ones ``minidalle train-codec`` writes load the same way.
``taming.models`` is never imported: it needs pytorch-lightning.

Checkpoints are read with ``torch.load(weights_only=True)``: no code from the file runs.
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Union

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from minidalle.errors import CheckpointError
from minidalle.fileio import atomic_write

# ``loss.*`` (discriminator, LPIPS) of a VQModel state_dict is dropped.
IGNORED = ("loss.",)
TAMING_TARGET = "taming.models.vqgan.VQModel"


@attrs.define
class VqganConfig:
    path: str  # the .ckpt (a dict with "state_dict", as taming / pytorch-lightning save it)
    # The taming YAML; default: found beside the checkpoint (see find_config_path).
    config_path: Union[str, None] = None


STRUCTURE_ENCODERS = ("conv", "patch")


class PatchEncoder(nn.Module):
    """One-channel images ``[B, 1, H, W]`` -> ``[B, z, H/p, W/p]`` from each ``p x p`` patch
    alone (a two-layer MLP over the patch's pixels, as 1x1 convolutions)."""

    def __init__(self, patch: int, z_channels: int):
        super().__init__()
        self.patch = patch
        self.mlp = nn.Sequential(nn.Conv2d(patch * patch, z_channels, 1), nn.SiLU(),
                                 nn.Conv2d(z_channels, z_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.pixel_unshuffle(x, self.patch))


class VQGAN(nn.Module):
    """taming's VQModel minus the loss and pytorch-lightning, plus the codec interface.

    ``encode``/``decode`` take and give images in [0, 1]; the network works in [-1, 1].

    ``structure`` (optional, minidalle's extension, not taming's): a value/chroma split into
    two codebooks, ``{"n_embed": K, "embed_dim": D}`` for the second. ``structure_encoder``
    sees only the per-pixel maximum over R, G and B (HSV's value: an outline, whatever its
    colour): taming's Encoder on one channel (``"encoder": "conv"``, the default), or with
    ``"encoder": "patch"`` a per-patch MLP on each code's own pixels, so a patch gets the
    same code wherever it is and whatever surrounds it; ``colour_encoder``, a per-patch MLP, sees only
    the chroma of each code's patch (:meth:`chroma`), so the first codebook's codes say
    "which colour" and nothing about the outline, and the second's "which outline" and
    nothing about the colour. (There is no full-image ``encoder`` then.) The decoder reads
    both quantized maps. An image code is the pair ``colour * K + structure``
    (``token_factors = (n_embed, K)``), so a transformer can predict colour and outline
    separately and compose a colour with an outline it never saw it drawn with (see
    :class:`minidalle.model.dalle.FactorisedLogits`).
    """

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int, beta: float = 0.25,
                 structure: dict | None = None):
        super().__init__()
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import VectorQuantizer

        self.ddconfig = dict(ddconfig)
        self.n_embed, self.embed_dim = int(n_embed), int(embed_dim)
        self.structure = None if not structure else {
            "n_embed": int(structure["n_embed"]), "embed_dim": int(structure["embed_dim"]),
            "encoder": str(structure.get("encoder", "conv"))}
        if self.structure:
            z = ddconfig["z_channels"]
            self.colour_encoder = nn.Sequential(nn.Conv2d(3, z, 1), nn.SiLU(), nn.Conv2d(z, z, 1))
        else:
            self.encoder = Encoder(**ddconfig)
        with contextlib.redirect_stdout(io.StringIO()):  # Decoder prints the z shape
            self.decoder = Decoder(**ddconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        latent_dim = embed_dim
        self.token_factors = None
        if self.structure:
            k, d = self.structure["n_embed"], self.structure["embed_dim"]
            self.structure_encoder = (
                PatchEncoder(2 ** (len(ddconfig["ch_mult"]) - 1), ddconfig["z_channels"])
                if self.structure["encoder"] == "patch" else Encoder(**{**ddconfig, "in_channels": 1}))
            self.structure_quant_conv = nn.Conv2d(ddconfig["z_channels"], d, 1)
            self.structure_quantize = VectorQuantizer(k, d, beta=beta)
            latent_dim += d
            self.token_factors = (self.n_embed, k)
        self.post_quant_conv = nn.Conv2d(latent_dim, ddconfig["z_channels"], 1)
        self.image_size = int(ddconfig["resolution"])
        self.fmap_size = self.image_size // 2 ** (len(ddconfig["ch_mult"]) - 1)
        self.num_tokens = self.n_embed * (self.structure["n_embed"] if self.structure else 1)
        self.frozen = False

    # ------------------------------------------------------------------ building blocks

    def codebooks(self) -> list[torch.Tensor]:
        """The codebook weights, ``[n_embed, embed_dim]`` each: colour (taming's) first."""
        books = [self.quantize.embedding.weight]
        if self.structure:
            books.append(self.structure_quantize.embedding.weight)
        return books

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantization latents [B, embed_dim, f, f] (first codebook)."""
        return self.quant_conv(self.encoder(x))

    def encode_latents(self, x: torch.Tensor, gain: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Images in [-1, 1] -> the pre-quantization latents of every codebook.

        ``gain`` (training only, ``[B]``) scales the structure encoder's input so that it
        cannot tell colours apart by their brightness.
        """
        if not self.structure:
            return [self.encode_latent(x)]
        latents = [self.quant_conv(self.colour_encoder(self.chroma(x)))]
        value = (x.amax(1, keepdim=True) + 1) / 2
        if gain is not None:
            value = (value * gain.view(-1, 1, 1, 1).to(value.dtype)).clamp(0, 1)
        latents.append(self.structure_quant_conv(self.structure_encoder(value * 2 - 1)))
        return latents

    def chroma(self, x: torch.Tensor) -> torch.Tensor:
        """The colour encoder's input ``[B, 3, f, f]``: per code patch, its mean RGB divided
        by its mean R+G+B (a chromaticity, as JPEG keeps chroma at a lower resolution; 0 for
        a black patch), in [-1, 1]. A patch that one pixel of red touches and a patch that
        red fills give the same input."""
        f = self.image_size // self.fmap_size
        mean = F.avg_pool2d((x.float() + 1) / 2, f)
        return (mean / (mean.sum(1, keepdim=True) + 1e-3) * 2 - 1).to(x.dtype)

    def nearest_codes(self, z: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, C, f, f] -> index of the nearest codebook entry, [B, f*f] int64.

        Distances are computed in fp32 even under autocast, so ties do not flip with precision.
        """
        b, c, h, w = z.shape
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, c)
        emb = (self.quantize.embedding.weight if codebook is None else codebook).float()
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.t()
        return d.argmin(1).view(b, h * w)

    def split_codes(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Image codes -> one index per codebook (a code is ``colour * K + structure``)."""
        from minidalle.model.dalle import split_ids

        return split_ids(codes, self.token_factors) if self.token_factors else [codes]

    def join_codes(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The inverse of :meth:`split_codes`."""
        from minidalle.model.dalle import join_ids

        return join_ids(parts, self.token_factors) if self.token_factors else parts[0]

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, f*f] -> quantized latents [B, latent channels, f, f]."""
        b, n = codes.shape
        f = int(round(n ** 0.5))
        if f * f != n:
            raise ValueError(f"expected a square number of codes, got {n}")
        z_q = torch.cat([F.embedding(part, book)
                         for part, book in zip(self.split_codes(codes), self.codebooks())], -1)
        return z_q.view(b, f, f, -1).permute(0, 3, 1, 2).contiguous()

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents -> images in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor, gain: torch.Tensor | None = None):
        """Training pass on images in [-1, 1]: (reconstruction, vq loss parts, codes, z).

        The vq loss is the VQ-VAE one: codebook term ||sg[z] - e||^2 plus ``beta`` times the
        commitment term ||z - sg[e]||^2; gradients pass the quantizer straight through.
        ``codes`` and ``z`` are lists, one entry per codebook.
        """
        codes, zs, quantized, codebook, commit = [], [], [], 0.0, 0.0
        for z, book in zip(self.encode_latents(x, gain), self.codebooks()):
            c = self.nearest_codes(z, book)
            b, _, h, w = z.shape
            z_q = F.embedding(c, book).view(b, h, w, -1).permute(0, 3, 1, 2).to(z.dtype)
            codebook = codebook + F.mse_loss(z_q, z.detach())
            commit = commit + F.mse_loss(z, z_q.detach())
            quantized.append(z + (z_q - z).detach())  # straight-through
            codes.append(c)
            zs.append(z)
        return self.decode_latent(torch.cat(quantized, 1)), codebook, commit, codes, zs

    # ------------------------------------------------------------------ codec interface

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [B, 3, H, W] in [0, 1] -> codes int64 [B, fmap_size**2]."""
        s = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"expected images [B, 3, {s}, {s}] (the codec's image_size), "
                             f"got {tuple(images.shape)}")
        x = images.to(self.quant_conv.weight.dtype) * 2 - 1
        # Codes must not depend on the caller's precision: a transformer trained under bf16
        # autocast (which also encodes its images) and evaluated in fp32 would otherwise see
        # other codes wherever two entries are nearly equidistant (a black patch's outline
        # code flipped on 93% of positions in a bf16 quickstart).
        with torch.autocast(images.device.type, enabled=False):
            return self.join_codes([self.nearest_codes(z, book)
                                    for z, book in zip(self.encode_latents(x), self.codebooks())])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, fmap_size**2] -> float images [B, 3, H, W] in [0, 1]."""
        codes = codes.long()
        if codes.dim() != 2 or codes.shape[1] != self.fmap_size ** 2:
            raise ValueError(
                f"expected codes [B, {self.fmap_size ** 2}], got {tuple(codes.shape)}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_tokens):
            raise ValueError(f"codes must be in [0, {self.num_tokens})")
        x = self.decode_latent(self.embed_codes(codes))
        return ((x.float() + 1) / 2).clamp(0, 1)

    def freeze(self) -> "VQGAN":
        self.eval()
        self.requires_grad_(False)
        self.frozen = True
        return self

    def train(self, mode: bool = True):
        # A frozen codec stays in eval mode when a parent module calls .train().
        return super().train(False if self.frozen else mode)


# ---------------------------------------------------------------------- the YAML


def find_config_path(ckpt: Path) -> Path:
    """The taming YAML that belongs to ``ckpt``.

    Tried in order: ``<stem>.yaml``/``.yml`` beside it; ``config.yaml``/``model.yaml`` in the
    same folder; ``../configs/model.yaml`` (taming's log layout, as the public ImageNet models
    ship: ``checkpoints/last.ckpt`` + ``configs/model.yaml``) or a single
    ``../configs/*-project.yaml`` written by taming's trainer; ``X.config.yml`` for
    ``X.model.ckpt`` (the DALLE-pytorch cache names).
    """
    d = ckpt.parent
    names = [f"{ckpt.stem}.yaml", f"{ckpt.stem}.yml", "config.yaml", "config.yml",
             "model.yaml", "model.yml"]
    if ckpt.stem.endswith(".model"):
        base = ckpt.stem[: -len(".model")]
        names += [f"{base}.config.yml", f"{base}.config.yaml"]
    candidates = [d / n for n in names] + [d.parent / "configs" / "model.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    projects = sorted((d.parent / "configs").glob("*-project.yaml"))
    if len(projects) == 1:
        return projects[0]
    tried = ", ".join(c.name if c.parent == d else str(c) for c in candidates)
    raise CheckpointError(
        f"{ckpt}: no taming YAML config found beside it (tried {tried}); "
        "set codec.config_path")


def read_taming_yaml(path: Path) -> tuple[dict, int, int, dict | None]:
    """``(ddconfig, n_embed, embed_dim, structure)`` from a taming model YAML (safe_load).

    ``structure`` is minidalle's optional ``model.params.structure`` table (the colour-blind
    second codebook, see :class:`VQGAN`); ``None`` in taming's own files.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: codec config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read codec config: {exc}") from None
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None

    def get(dotted: str):
        node = data
        for key in dotted.split("."):
            if not isinstance(node, dict) or key not in node:
                raise CheckpointError(f"{path}: {dotted}: missing (expected a taming VQModel config)")
            node = node[key]
        return node

    target = data.get("model", {}).get("target") if isinstance(data, dict) and isinstance(
        data.get("model"), dict) else None
    if target is not None and not str(target).endswith("VQModel"):
        raise CheckpointError(
            f"{path}: model.target: only {TAMING_TARGET} checkpoints are supported, got {target!r}")
    dd = get("model.params.ddconfig")
    n_embed, embed_dim = get("model.params.n_embed"), get("model.params.embed_dim")
    if not isinstance(dd, dict):
        raise CheckpointError(f"{path}: model.params.ddconfig: expected a mapping")
    for key, value in (("model.params.n_embed", n_embed), ("model.params.embed_dim", embed_dim)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{path}: {key}: expected a positive integer, got {value!r}")
    required = ("ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "in_channels",
                "resolution", "z_channels")
    for key in required:
        if key not in dd:
            raise CheckpointError(f"{path}: model.params.ddconfig.{key}: missing")
    res, ch_mult = dd["resolution"], dd["ch_mult"]
    if not isinstance(ch_mult, list) or not ch_mult:
        raise CheckpointError(f"{path}: model.params.ddconfig.ch_mult: expected a non-empty list")
    down = 2 ** (len(ch_mult) - 1)
    if not isinstance(res, int) or res <= 0 or res % down:
        raise CheckpointError(
            f"{path}: model.params.ddconfig.resolution: expected a positive multiple of {down} "
            f"(2**(len(ch_mult)-1)), got {res!r}")
    if dd["in_channels"] != 3 or dd["out_ch"] != 3:
        raise CheckpointError(f"{path}: model.params.ddconfig: in_channels and out_ch must be 3 (RGB)")
    if dd.get("double_z", True):
        # taming's VQGAN configs set double_z: False; True would double the encoder output.
        raise CheckpointError(f"{path}: model.params.ddconfig.double_z: expected False for a VQGAN")
    structure = get("model.params").get("structure")
    if structure is not None:
        ok = isinstance(structure, dict) and all(
            isinstance(structure.get(k), int) and not isinstance(structure.get(k), bool)
            and structure[k] > 0 for k in ("n_embed", "embed_dim"))
        if not ok:
            raise CheckpointError(f"{path}: model.params.structure: expected {{n_embed: K, "
                                  f"embed_dim: D}} with positive integers, got {structure!r}")
        if structure.get("encoder", "conv") not in STRUCTURE_ENCODERS:
            raise CheckpointError(f"{path}: model.params.structure.encoder: expected one of "
                                  f"{', '.join(STRUCTURE_ENCODERS)}, got {structure['encoder']!r}")
    return dict(dd), n_embed, embed_dim, structure


def taming_yaml(ddconfig: dict, n_embed: int, embed_dim: int, extra: dict | None = None,
                structure: dict | None = None) -> dict:
    """The YAML table taming's own tools write for a VQModel (plus ``structure`` if any)."""
    params = {"embed_dim": int(embed_dim), "n_embed": int(n_embed), "ddconfig": dict(ddconfig),
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"}}
    if structure:
        # the default conv encoder is left unsaid, so such YAMLs read as before
        params["structure"] = {k: v for k, v in structure.items()
                               if not (k == "encoder" and v == "conv")}
    return {"model": {"target": TAMING_TARGET, "params": params, **(extra or {})}}


# ---------------------------------------------------------------------- the .ckpt


class _Opaque:
    """Inert stand-in for non-tensor objects (pytorch-lightning callbacks, ...) in a .ckpt.

    It is allowlisted for ``weights_only`` loading under the names the file asks for, so the
    file loads without running any of its code; the objects are discarded.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|unrecognized function <?([\w.]+)|got <class '([\w.]+)'>")


def _weights_only_load(path: Path):
    """``torch.load(weights_only=True)``; names the file's unknown globals stand-ins if needed."""
    import pickle

    opaque: list[str] = []
    try:
        opaque = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy (non-zip) format or unreadable: found one by one below
        pass
    last_error = None
    for _ in range(32):
        try:
            with torch.serialization.safe_globals([(_Opaque, name) for name in opaque]):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            last_error = exc
            m = _GLOBAL_RE.search(str(exc))
            name = next((g for g in m.groups() if g), None) if m else None
            if not name or name in opaque:
                break
            opaque.append(name)
    msg = " ".join(str(last_error).split())[:300]
    raise CheckpointError(
        f"{path}: torch.load(weights_only=True) refused the file ({msg}); minidalle never "
        "unpickles code from a checkpoint. Re-save just its weights in a trusted session: "
        "torch.save({'state_dict': torch.load(PATH, weights_only=False)['state_dict']}, NEW)")


def load_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a taming/pytorch-lightning .ckpt (``state_dict``), ``loss.*`` dropped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: codec checkpoint not found")
    try:
        obj = _weights_only_load(path)
    except CheckpointError:
        raise
    except Exception as exc:  # zip/pickle/EOF errors from a truncated or corrupt file
        msg = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a dict with a 'state_dict' of tensors")
    return {k: v for k, v in sd.items() if not k.startswith(IGNORED)}


def load_weights(model: VQGAN, sd: dict, path) -> None:
    """Copy ``sd`` into ``model``; missing, unexpected or mis-shaped keys are a CheckpointError."""

    def some(keys):
        keys = sorted(keys)
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

    own = model.state_dict()
    missing = set(own) - set(sd)
    if missing:
        raise CheckpointError(f"{path}: missing {len(missing)} key(s): {some(missing)}")
    unexpected = set(sd) - set(own)
    if unexpected:
        raise CheckpointError(
            f"{path}: unexpected key(s) {some(unexpected)}: not a taming VQModel or the YAML "
            "does not match the checkpoint")
    for k, v in own.items():
        if sd[k].shape != v.shape:
            raise CheckpointError(
                f"{path}: {k}: shape {tuple(sd[k].shape)} in the checkpoint, "
                f"{tuple(v.shape)} from the YAML config (do they belong together?)")
    model.load_state_dict({k: v.float() for k, v in sd.items()})


def load_vqgan(path, config_path=None) -> VQGAN:
    """A frozen :class:`VQGAN` from a taming .ckpt and its YAML."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: codec checkpoint not found")
    config_path = Path(config_path) if config_path else find_config_path(path)
    ddconfig, n_embed, embed_dim, structure = read_taming_yaml(config_path)
    try:
        model = VQGAN(ddconfig, n_embed, embed_dim, structure=structure)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: model.params.ddconfig: cannot build the network: {exc}") from None
    load_weights(model, load_state_dict(path), path)
    return model.freeze()


def save_vqgan(model: VQGAN, ckpt_path, yaml_path=None, *, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``model`` as taming does: ``{"state_dict": ...}`` .ckpt plus the .yaml beside it.

    Both files are written atomically; the .ckpt holds only tensors and plain Python values,
    so it loads with ``weights_only=True``.
    """
    import yaml

    ckpt_path = Path(ckpt_path)
    yaml_path = Path(yaml_path) if yaml_path else ckpt_path.with_suffix(".yaml")
    text = yaml.safe_dump(taming_yaml(model.ddconfig, model.n_embed, model.embed_dim,
                                      structure=model.structure), sort_keys=False)
    atomic_write(yaml_path, lambda f: f.write(text.encode()))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = {"state_dict": state, **(meta or {})}
    atomic_write(ckpt_path, lambda f: torch.save(blob, f))
    return ckpt_path, yaml_path


def build(config: VqganConfig) -> VQGAN:
    return load_vqgan(config.path, config.config_path)
