"""Train a small VQGAN-architecture codec for data that has no public VQGAN.

``train_codec(cfg)`` reads the ``[codec_training]`` table (:class:`CodecTrainingConfig`),
trains taming's Encoder/Decoder/VectorQuantizer (as :class:`~minidalle.components.
codec_vqgan.VQGAN`) on the config's ``[dataset]`` with a reconstruction loss (L1 or MSE),
the VQ codebook and commitment losses and, when local VGG16 weights are given, a perceptual
loss; re-initialises dead codebook entries from recent encoder outputs; and writes:

* ``OUT`` (``.ckpt``, taming format ``{"state_dict": ...}``) and ``OUT.yaml`` beside it, so
  the ``vqgan`` codec loads it (``[codec] name = "vqgan"  path = "OUT"``);
* ``<stem>.metrics.json``: held-out PSNR, codebook usage and perplexity, speed;
* ``<stem>.recon.png``: held-out images (top row) and their reconstructions (bottom row).

There is no adversarial (GAN) loss: on small, simple data the reconstruction losses are
enough and train in minutes on a CPU.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Union

import attrs
import torch
import torch.nn.functional as F

from minidalle import hardware
from minidalle.config import Config, non_negative, one_of, positive, read_section
from minidalle.components.codecs.vqgan import STRUCTURE_ENCODERS
from minidalle.errors import CheckpointError, ConfigError, DataError

SECTION = "codec_training"


def _multiples_of_32(instance, attribute, value):
    # taming's blocks use GroupNorm(32 groups): every channel count must be a multiple of 32.
    from minidalle.config import FieldError

    if attribute.name == "ch" and value % 32:
        raise FieldError(f"ch: expected a multiple of 32 (taming uses GroupNorm with 32 groups), got {value}")
    if attribute.name == "ch_mult" and (not value or any(m <= 0 for m in value)):
        raise FieldError(f"ch_mult: expected a non-empty list of positive integers, got {value!r}")


@attrs.define
class CodecTrainingConfig:
    image_size: int = attrs.field(default=32, validator=positive)
    # Network (taming ddconfig): fmap_size = image_size / 2**(len(ch_mult) - 1).
    ch: int = attrs.field(default=32, validator=[positive, _multiples_of_32])
    ch_mult: list[int] = attrs.field(factory=lambda: [1, 2, 2], validator=_multiples_of_32)
    num_res_blocks: int = attrs.field(default=1, validator=positive)
    attn_resolutions: list[int] = attrs.field(factory=list)
    z_channels: int = attrs.field(default=32, validator=positive)
    dropout: float = attrs.field(default=0.0, validator=non_negative)
    n_embed: int = attrs.field(default=128, validator=positive)
    embed_dim: int = attrs.field(default=32, validator=positive)
    beta: float = attrs.field(default=0.25, validator=non_negative)  # commitment weight
    # A second, colour-blind codebook of this many entries (0: none): its encoder sees only
    # max(R, G, B), so its codes say "which outline" and the first codebook's "which colour";
    # an image code is the pair (see codec_vqgan.VQGAN). Default width: embed_dim.
    structure_n_embed: int = attrs.field(default=0, validator=non_negative)
    structure_embed_dim: Union[int, None] = attrs.field(default=None, validator=positive)
    # "conv": taming's Encoder (each code sees its neighbours); "patch": a per-patch MLP,
    # so a patch gets one code wherever it is (see codecs.vqgan.VQGAN).
    structure_encoder: str = attrs.field(default="conv", validator=one_of(*STRUCTURE_ENCODERS))
    # Training only: the structure encoder's input is scaled by a random gain in
    # [1 - jitter, 1] per image, so brightness cannot tell it the colour.
    structure_gain_jitter: float = attrs.field(default=0.4, validator=non_negative)
    # "ema": codebook entries follow moving averages of the encoder outputs assigned to them
    # (VQ-VAE appendix; learns faster than "gradient", the codebook loss of taming's VQGAN).
    codebook_update: str = attrs.field(default="ema", validator=one_of("ema", "gradient"))
    ema_decay: float = attrs.field(default=0.95, validator=non_negative)
    # Optimisation
    steps: int = attrs.field(default=600, validator=positive)
    batch_size: int = attrs.field(default=32, validator=positive)
    lr: float = attrs.field(default=2e-3, validator=positive)
    warmup_steps: int = attrs.field(default=20, validator=non_negative)
    min_lr_ratio: float = attrs.field(default=0.05, validator=non_negative)  # cosine floor
    rec_loss: str = attrs.field(default="mse", validator=one_of("mse", "l1"))
    perceptual_weight: float = attrs.field(default=0.0, validator=non_negative)
    # A local torchvision VGG16 state_dict (e.g. vgg16-397923af.pth); never downloaded.
    vgg_weights: Union[str, None] = None
    # "auto": bf16 where the probe measures native, faster bf16 products (minidalle.hardware).
    precision: str = attrs.field(default="auto", validator=one_of("auto", "fp32", "bf16"))
    # Dead-code restart: every `restart_every` steps, codes used fewer than
    # `restart_threshold` times since the last check get a random recent encoder output.
    restart_every: int = attrs.field(default=25, validator=non_negative)  # 0: never
    restart_threshold: int = attrs.field(default=1, validator=non_negative)
    restart_until: float = attrs.field(default=0.8, validator=non_negative)  # share of steps
    # Data
    split: str = "train"
    heldout: int = attrs.field(default=64, validator=positive)  # last items of the split
    workers: int = attrs.field(default=0, validator=non_negative)
    # CPU threads for training (default: torch's). 1 is much faster on a machine busy with
    # other work, where every op of a thread pool waits for a descheduled thread.
    threads: Union[int, None] = attrs.field(default=None, validator=positive)
    seed: Union[int, None] = None  # default: run.seed
    log_every: int = attrs.field(default=50, validator=positive)
    # Output .ckpt; default <run.out_dir>/codec/vqgan.ckpt. The .yaml goes beside it.
    out: str = ""

    def structure(self) -> dict | None:
        if not self.structure_n_embed:
            return None
        return {"n_embed": self.structure_n_embed,
                "embed_dim": self.structure_embed_dim or self.embed_dim,
                "encoder": self.structure_encoder}

    def ddconfig(self) -> dict:
        return {"double_z": False, "z_channels": self.z_channels, "resolution": self.image_size,
                "in_channels": 3, "out_ch": 3, "ch": self.ch, "ch_mult": list(self.ch_mult),
                "num_res_blocks": self.num_res_blocks,
                "attn_resolutions": list(self.attn_resolutions), "dropout": self.dropout}


def read_settings(cfg: Config) -> CodecTrainingConfig:
    """The validated ``[codec_training]`` table of ``cfg`` (defaults when absent)."""
    ct = read_section(cfg, SECTION, CodecTrainingConfig)
    down = 2 ** (len(ct.ch_mult) - 1)
    if ct.image_size % down:
        raise ConfigError(f"{cfg.source}: {SECTION}.image_size: expected a multiple of {down} "
                          f"(2**(len(ch_mult)-1)), got {ct.image_size}")
    if ct.structure_gain_jitter >= 1:
        raise ConfigError(f"{cfg.source}: {SECTION}.structure_gain_jitter: expected a value in "
                          f"[0, 1), got {ct.structure_gain_jitter}")
    if ct.perceptual_weight > 0 and not ct.vgg_weights:
        raise ConfigError(f"{cfg.source}: {SECTION}.vgg_weights: perceptual_weight > 0 needs a "
                          "local VGG16 weights file (nothing is downloaded)")
    return ct


def output_path(cfg: Config, ct: CodecTrainingConfig) -> Path:
    return Path(ct.out) if ct.out else Path(cfg.run.out_dir) / "codec" / "vqgan.ckpt"


# ---------------------------------------------------------------------- pieces


def restart_dead_codes(weight: torch.Tensor, counts: torch.Tensor, recent: torch.Tensor,
                       threshold: int = 1, optimizer=None, generator=None) -> int:
    """Re-initialise codebook rows used fewer than ``threshold`` times; return how many.

    ``weight``: the codebook [n_embed, dim]; ``counts``: uses per code since the last check;
    ``recent``: recent encoder outputs [N, dim]. Dead rows get recent outputs drawn with
    probability proportional to their squared distance from the nearest live code (k-means++
    seeding: a restart goes where the codebook serves the data worst, e.g. two colours that
    share one code, not to the bulk of the data that is already well served), plus a little
    noise so that two restarts from one vector separate; their optimizer moments are cleared
    so old momentum does not drag them back.
    """
    dead = counts < threshold
    k = int(dead.sum())
    if k == 0 or recent.numel() == 0:
        return 0
    live = weight.detach().float()[~dead]
    if live.shape[0]:
        d = torch.cdist(recent.float(), live).min(1).values.pow(2)
        pick = torch.multinomial(d + 1e-12, k, replacement=True, generator=generator)
    else:
        pick = torch.randint(0, recent.shape[0], (k,), generator=generator)
    noise = torch.randn(k, recent.shape[1], generator=generator) * (0.01 * recent.std() + 1e-6)
    with torch.no_grad():
        weight[dead] = (recent[pick] + noise).to(weight.dtype)
    state = optimizer.state.get(weight, {}) if optimizer is not None else {}
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][dead] = 0
    return k


class EmaCodebook:
    """Moving-average codebook updates; the statistics live here, not in the checkpoint."""

    def __init__(self, weight: torch.Tensor, decay: float, eps: float = 1e-5):
        self.weight, self.decay, self.eps = weight, decay, eps
        self.cluster_size = torch.ones(weight.shape[0])
        self.embed_sum = weight.detach().float().clone()

    @torch.no_grad()
    def update(self, z: torch.Tensor, codes: torch.Tensor) -> None:
        """``z``: encoder outputs [N, dim]; ``codes``: their nearest entries [N]."""
        n, d = self.weight.shape[0], self.decay
        counts = torch.bincount(codes, minlength=n).float()
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z.float())
        self.cluster_size.mul_(d).add_(counts, alpha=1 - d)
        self.embed_sum.mul_(d).add_(sums, alpha=1 - d)
        total = self.cluster_size.sum()  # Laplace smoothing keeps empty clusters finite
        size = (self.cluster_size + self.eps) / (total + n * self.eps) * total
        self.weight.copy_(self.embed_sum / size[:, None])

    @torch.no_grad()
    def reset(self, rows: torch.Tensor) -> None:
        """Restart the statistics of ``rows`` (a mask) from their current entries."""
        self.cluster_size[rows] = 1.0
        self.embed_sum[rows] = self.weight[rows].float()


def usage_stats(counts: torch.Tensor) -> tuple[float, float]:
    """(share of codes used, perplexity) of a histogram of code uses."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).double().mean().item(), math.exp(entropy.item())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def collate_images(items: list) -> torch.Tensor:
    """Stack the ``image`` of dataset items (uint8 [3, S, S]) into a uint8 batch."""
    return torch.stack([item["image"] for item in items])


class VggPerceptual(torch.nn.Module):
    """Feature distance of a frozen VGG16 (relu1_2, relu2_2, relu3_3) from local weights."""

    LAYERS = (3, 8, 15)

    def __init__(self, path: str):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        from minidalle.errors import CheckpointError

        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"{SECTION}.vgg_weights: {path}: file not found") from None
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read VGG16 weights: {exc}") from None
        feats = make_layers(cfgs["D"][:9])  # VGG16 features[:16]: conv1_1 .. relu3_3
        own = {k: v for k, v in sd.items() if k.startswith("features.")}
        own = {k[len("features."):]: v for k, v in own.items()
               if int(k.split(".")[1]) <= self.LAYERS[-1]}
        try:
            feats.load_state_dict(own)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: not torchvision VGG16 weights: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.features = feats.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x, y):  # images in [-1, 1]
        h = torch.cat([x, y])
        h = ((h + 1) / 2 - self.mean) / self.std
        loss = 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                a, b = h.chunk(2)
                loss = loss + F.mse_loss(a, b)
        return loss


def _infinite(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------------- training


def train_codec(cfg: Config, *, registry=None, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and save a codec as ``[codec_training]`` says; return the metrics."""
    ct = read_settings(cfg)
    threads = torch.get_num_threads()
    if ct.threads:
        torch.set_num_threads(ct.threads)
    try:
        return _train(cfg, ct, registry, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: Config, ct: CodecTrainingConfig, registry, log) -> dict:
    """The codec's training run: data, model and codebook start, the step loop, then the
    held-out evaluation and the files (each step below a function of its own)."""
    from minidalle.components.codecs.vqgan import VQGAN

    if cfg.dataset is None:
        raise ConfigError(f"{cfg.source}: dataset: train-codec needs a [dataset] section")
    registry = registry or cfg.registry
    ct = attrs.evolve(ct, precision=hardware.resolve_precision(
        ct.precision, what=f"{SECTION}.precision", log=log))
    seed = cfg.run.seed if ct.seed is None else ct.seed
    out = output_path(cfg, ct)
    torch.manual_seed(seed)
    ds, loader, g = _data(cfg, ct, registry, seed, out)
    n = len(ds)

    model = VQGAN(ct.ddconfig(), ct.n_embed, ct.embed_dim, beta=ct.beta, structure=ct.structure())
    books = model.codebooks()  # one or two codebooks, each with its EMA, use counts, restarts
    perceptual = VggPerceptual(ct.vgg_weights) if ct.perceptual_weight > 0 else None
    emas = [EmaCodebook(book, ct.ema_decay) for book in books] if ct.codebook_update == "ema" else None
    params = [p for p in model.parameters() if emas is None or all(p is not b for b in books)]
    opt = torch.optim.Adam(params, lr=ct.lr, betas=(0.5, 0.9))

    def lr_factor(step):  # linear warmup, then cosine down to min_lr_ratio
        if step < ct.warmup_steps:
            return (step + 1) / ct.warmup_steps
        t = (step - ct.warmup_steps) / max(1, ct.steps - ct.warmup_steps)
        return ct.min_lr_ratio + (1 - ct.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    def gains(batch):
        if not model.structure or ct.structure_gain_jitter == 0:
            return None
        return 1 - ct.structure_gain_jitter * torch.rand(batch, generator=g)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    rec_fn = F.l1_loss if ct.rec_loss == "l1" else F.mse_loss
    counts = [torch.zeros(b.shape[0], dtype=torch.long) for b in books]
    batches = _infinite(loader)
    n_params = sum(p.numel() for p in model.parameters())
    sizes = " x ".join(str(b.shape[0]) for b in books)
    log(f"train-codec: {n - ct.heldout} training images from dataset {cfg.dataset.name!r}, "
        f"{ct.heldout} held out; {ct.image_size}px -> {model.fmap_size}x{model.fmap_size} codes "
        f"of {sizes}; {n_params / 1e6:.2f}M parameters; {ct.steps} steps of {ct.batch_size} "
        f"({ct.precision})")
    _start_codebooks(model, books, counts, emas, next(batches), g)

    model.train()
    start = last_t = time.perf_counter()
    seen = seen_at_log = restarted = 0
    loss_sum = rec_sum = vq_sum = 0.0
    for step in range(1, ct.steps + 1):
        x = next(batches).float() / 127.5 - 1
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ct.precision == "bf16"):
            rec, codebook, commit, codes, z = model(x, gains(x.shape[0]))
            rec = rec.float()
            rec_loss = rec_fn(rec, x)
            vq_loss = ct.beta * commit + (codebook if emas is None else 0.0)
            loss = rec_loss + vq_loss
            if perceptual is not None:
                loss = loss + ct.perceptual_weight * perceptual(rec, x)
        if not torch.isfinite(loss):
            raise DataError(f"train-codec: loss became {loss.item()} at step {step}; "
                            f"lower {SECTION}.lr or use precision = \"fp32\"")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        for i, book in enumerate(books):
            if emas is not None:
                emas[i].update(_flat(z[i]), codes[i].flatten())
            counts[i] += torch.bincount(codes[i].flatten(), minlength=book.shape[0])
        seen += x.shape[0]
        loss_sum += loss.item()
        rec_sum += rec_loss.item()
        vq_sum += vq_loss.item()

        usage = None
        if ct.restart_every and step % ct.restart_every == 0 and step <= ct.restart_until * ct.steps:
            usage = min(usage_stats(c)[0] for c in counts)
            for i, book in enumerate(books):
                dead = counts[i] < ct.restart_threshold
                restarted += restart_dead_codes(book, counts[i], _flat(z[i]), ct.restart_threshold, opt, g)
                if emas is not None:
                    emas[i].reset(dead)
                counts[i].zero_()
        if step % ct.log_every == 0 or step == ct.steps:
            now = time.perf_counter()
            k = ct.log_every if step % ct.log_every == 0 else step % ct.log_every
            used = min(usage_stats(c)[0] for c in counts) if usage is None else usage
            log(f"step {step}/{ct.steps} | Loss: {loss_sum / k:.4f} | rec {rec_sum / k:.4f} | "
                f"vq {vq_sum / k:.4f} | usage {used:.0%} | restarted {restarted} | "
                f"lr {sched.get_last_lr()[0]:.2e} | {(seen - seen_at_log) / (now - last_t):.0f} img/s")
            loss_sum = rec_sum = vq_sum = 0.0
            last_t, seen_at_log = now, seen
    train_seconds = time.perf_counter() - start

    metrics, held, recon = _evaluate(model, books, ds, range(n - ct.heldout, n))
    metrics.update(steps=ct.steps, train_seconds=round(train_seconds, 1),
                   images_per_second=round(seen / train_seconds, 1), image_size=ct.image_size,
                   fmap_size=model.fmap_size, n_embed=ct.n_embed, num_tokens=model.num_tokens,
                   restarted_codes=restarted, checkpoint=str(out))
    _save(model, cfg, ct, out, metrics, held, recon, log)
    return metrics


def _flat(z):  # [B, C, f, f] -> [B*f*f, C]
    return z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def _data(cfg: Config, ct: CodecTrainingConfig, registry, seed: int, out: Path):
    """(dataset, loader over all but its last ``heldout`` items, the run's generator)."""
    from torch.utils.data import DataLoader, Subset

    ds = registry.get("dataset", cfg.dataset.name).build(
        cfg.dataset.params, image_size=ct.image_size, split=ct.split, seed=seed)
    n = len(ds)
    if n < ct.heldout + ct.batch_size:
        raise DataError(f"dataset {cfg.dataset.name!r} ({ct.split}) has {n} items; train-codec "
                        f"needs heldout ({ct.heldout}) + batch_size ({ct.batch_size})")
    first = ds[0]
    image = first.get("image") if isinstance(first, dict) else None
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 \
            or tuple(image.shape) != (3, ct.image_size, ct.image_size):
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else (
            "no 'image' key" if not isinstance(first, dict) or "image" not in first else type(image).__name__)
        raise DataError(f"dataset {cfg.dataset.name!r}: item 0: expected 'image' uint8 "
                        f"[3, {ct.image_size}, {ct.image_size}], got {got}")
    if out.is_dir() or out.suffix in ("", "."):
        raise ConfigError(f"{cfg.source}: {SECTION}.out: expected a .ckpt file path, got {str(out)!r}")
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(Subset(ds, range(n - ct.heldout)), batch_size=ct.batch_size, shuffle=True,
                        drop_last=True, num_workers=ct.workers, collate_fn=collate_images,
                        generator=g, persistent_workers=ct.workers > 0)
    return ds, loader, g


def _start_codebooks(model, books, counts, emas, first_batch, g) -> None:
    """Data-dependent codebook start: every code begins as a real encoder output (a restart
    of all)."""
    with torch.no_grad():
        z0 = model.encode_latents(first_batch.float() / 127.5 - 1)
    for i, book in enumerate(books):
        restart_dead_codes(book, counts[i], _flat(z0[i]), threshold=1, generator=g)
        if emas is not None:
            emas[i].reset(torch.ones(book.shape[0], dtype=torch.bool))


def _evaluate(model, books, ds, heldout_idx):
    """Held-out PSNR and code use through the codec interface (fp32, as the vqgan codec runs):
    (metrics, the held-out images, their reconstructions)."""
    model.freeze()
    held = torch.stack([ds[i]["image"] for i in heldout_idx]).float() / 255
    codes = torch.cat([model.encode(held[i:i + 64]) for i in range(0, len(held), 64)])
    recon = torch.cat([model.decode(codes[i:i + 64]) for i in range(0, len(codes), 64)])
    usage, perplexity = usage_stats(torch.bincount(codes.flatten(), minlength=model.num_tokens))
    metrics = {
        "psnr": round(psnr(recon, held).mean().item(), 3),
        "usage": round(usage, 4),
        "perplexity": round(perplexity, 2),
        "heldout_images": len(held),
        # per codebook (colour, structure): share of its entries the held-out images use
        "codebook_usage": [round(usage_stats(torch.bincount(part.flatten(), minlength=b.shape[0]))[0], 4)
                           for part, b in zip(model.split_codes(codes), books)],
    }
    return metrics, held, recon


def _save(model, cfg: Config, ct: CodecTrainingConfig, out: Path, metrics: dict, held, recon, log) -> None:
    """The checkpoint + YAML, ``<stem>.metrics.json`` and ``<stem>.recon.png``, each atomically."""
    from minidalle.components.codecs.vqgan import save_vqgan
    from minidalle.fileio import atomic_write

    meta = {"global_step": ct.steps, "minidalle": {"metrics": dict(metrics), SECTION: attrs.asdict(ct),
                                                   "dataset": cfg.dataset.name}}
    metrics_path = out.with_name(out.stem + ".metrics.json")
    text = json.dumps(metrics, indent=2) + "\n"
    try:
        ckpt, yaml_path = save_vqgan(model, out, meta=meta)
        atomic_write(metrics_path, lambda f: f.write(text.encode()))
        _save_grid(held[:8], recon[:8], out.with_name(out.stem + ".recon.png"), atomic_write)
    except OSError as exc:
        raise CheckpointError(f"{out}: cannot write the codec: {exc.strerror or exc}") from None
    log(f"held-out: PSNR {metrics['psnr']:.2f} dB | codebook usage {metrics['usage']:.0%} | "
        f"perplexity {metrics['perplexity']:.1f} of {model.num_tokens} | {metrics['train_seconds']:.0f} s")
    log(f"wrote {ckpt} + {yaml_path.name}, {metrics_path.name}; use it with "
        f"[codec] name = \"vqgan\", path = \"{ckpt}\"")


def _save_grid(images, recon, path: Path, atomic_write) -> None:
    from PIL import Image

    grid = torch.cat([torch.cat(list(images), 2), torch.cat(list(recon), 2)], 1)  # [3, 2S, nS]
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    def write(f):
        Image.fromarray(arr).save(f, format="PNG")

    atomic_write(path, write)
