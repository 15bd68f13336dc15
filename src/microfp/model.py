"""The 3D ResNet VAE of the paper (sections 2.2-2.3, Table 3) and its loss, in one module.

Shapes (``b`` = ``base_channels``, ``s = n / 16``, ``c`` = ``bottleneck_channels``)::

    x (B, 3, n, n, n) in [0, 1]
    encoder  stem      conv k7 s2, 3 -> b                      n/2
             layer 1   blocks[0] x ResBlock(b)                 n/2
             down      conv k3 s2, b -> 2b                     n/4
             layer 2   blocks[1] x ResBlock(2b)                n/4
             down      conv k3 s2, 2b -> 4b                    n/8
             layer 3   blocks[2] x ResBlock(4b)                n/8
             down      conv k3 s2, 4b -> 8b                    n/16
             layer 4   blocks[3] x ResBlock(8b)                n/16
             squeeze   conv k1 (bias, no BN), 8b -> c          (the lean bottleneck, see below)
             flatten -> Linear(c s^3, hidden) -> ReLU -> Linear(hidden, latent) twice: mu, ln(sigma^2)
    z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) per sample, only in training; eval: z = mu
    decoder  Linear(latent, hidden) -> ReLU -> Linear(hidden, c s^3) -> ReLU -> conv k1 (bias), c -> 8b
             3 x [ConvTranspose k4 s2 (halving channels) + BN + ReLU, ResBlock]   n/16 -> n/2
             ConvTranspose k4 s2, b -> b/2 + BN + ReLU, conv k3, b/2 -> 3, sigmoid        n

ResBlock = conv-BN-ReLU-conv-BN, plus the input (skip), then ReLU (paper section 2.2.2). The blocks per
layer are ``BLOCKS[encoder]`` (Table 3). The fingerprint of a VE is ``mu`` (:meth:`VAE.encode`).

Lean bottleneck: the reference code flattens 512 x 4^3 = 32768 features into two dense 32768 x 8192
layers (~606M parameters at 64^3, ~2.4 GB of fp32 weights). Here a 1x1x1 convolution first squeezes the
channels to ``bottleneck_channels`` (32: 2048 features at 64^3), which keeps the hidden layer of 8192 the
paper specifies while cutting its dense layers ~16x. :func:`param_count` reports the parts.

Linear path (``linear_grid`` > 0, issue 11; off in the paper's architecture): the input's block means
on a ``g^3`` grid, ``(B, C g^3)``, go through one linear layer into ``mu`` (added to the ResNet's), and
``z`` through one linear layer to a ``(B, C, g, g, g)`` block field, trilinearly interpolated to ``n`` and
added to the decoder's output. :meth:`VAE.init_linear_path` sets it to the principal components of
the training block means before training, with the ResNet's ``mu`` head and last convolution at zero.

The loss (:func:`vae_loss`) is ``alpha * BCE + (1 - alpha) * FFT + beta * KL`` for Euler fields, the
symmetry-reduced misorientation for quaternions, the MSE of the whitened harmonics for ``harmonics``
(:mod:`microfp.harmonics`); see its docstring for the reductions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from microfp.atomic import atomic_output
from microfp.config import Params
from microfp.errors import MicrofpError
from microfp.harmonics import CHANNELS as HARMONIC_CHANNELS, nearest_orientation, whitened_field
from microfp.rotations import euler_field_to_quaternion, quaternion_field_to_euler, symmetric_misorientation_loss

BLOCKS: dict[str, tuple[int, int, int, int]] = {
    # Table 3 of the paper: residual blocks in each of the 4 layers.
    "resnet12": (1, 1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}
REPRESENTATIONS = ("euler", "quaternion", "harmonics")
CHANNELS: dict[str, int] = {"euler": 3, "quaternion": 4}  # harmonics: HARMONIC_CHANNELS[crystal] (9 or 18)
LOGVAR_INIT = -6.0  # initial ln(sigma^2) of q(z | x): sigma = 0.05 (see Encoder)
LOGVAR_RANGE = (-30.0, 20.0)  # ln(sigma^2) is clamped to it: exp() stays finite (no inf KL)
# Reference size of the loss normalisation: the paper's 64^3 VE with 3 channels. The FFT term and the
# KL term are scaled to it, so that alpha and beta mean the same at every ve_size (see vae_loss).
REF_VOXELS = 64**3
REF_ELEMENTS = 3 * REF_VOXELS


@dataclass(frozen=True)
class VAEConfig:
    """Everything that fixes the architecture (and so the shape of a checkpoint's weights)."""

    encoder: str = "resnet18"
    ve_size: int = 64
    latent_dim: int = 256
    hidden_dim: int = 8192
    base_channels: int = 64
    bottleneck_channels: int = 32
    representation: str = "euler"  # "euler": 3 normalised angles (paper); "quaternion": 4 channels, FZ;
    # "harmonics": the whitened symmetry-invariant harmonics (microfp.harmonics), 9 cubic / 18 hexagonal
    crystal: str = "cubic"  # symmetry of the quaternion / harmonics representation and its loss
    linear_grid: int = 0  # > 0: the linear path on a linear_grid^3 grid of block means (module docstring); 0: off (paper)

    def __post_init__(self) -> None:
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {self.representation!r}")
        if self.crystal not in ("cubic", "hexagonal"):
            raise ValueError(f"crystal must be cubic or hexagonal, got {self.crystal!r}")
        if self.encoder not in BLOCKS:
            raise ValueError(f"encoder must be one of {', '.join(BLOCKS)}, got {self.encoder!r}")
        if self.ve_size < 16 or self.ve_size % 16:
            raise ValueError(f"ve_size must be a positive multiple of 16, got {self.ve_size}")
        for key in ("latent_dim", "hidden_dim", "base_channels", "bottleneck_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.linear_grid < 0 or (self.linear_grid and self.ve_size % self.linear_grid):
            raise ValueError(f"linear_grid must be 0 or divide ve_size ({self.ve_size}), got {self.linear_grid}")

    @property
    def flat_dim(self) -> int:
        """Features entering the hidden layer: bottleneck_channels * (ve_size / 16)^3."""
        return self.bottleneck_channels * (self.ve_size // 16) ** 3

    @property
    def channels(self) -> int:
        """Channels per voxel the network sees and returns: 3 (Euler), 4 (quaternion), 9 or 18 (harmonics)."""
        if self.representation == "harmonics":
            return HARMONIC_CHANNELS[self.crystal]
        return CHANNELS[self.representation]

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


def conv_relu(cin: int, cout: int) -> nn.Sequential:
    """1x1x1 convolution with bias, ReLU: the lean bottleneck's squeeze / unsqueeze. No BatchNorm there:
    at n/16 voxels per edge (1-4) its batch statistics standardise each VE against the other VEs of a
    batch of 8, which erases the absolute orientation the fingerprint must carry (issue 11: with it a
    tiny model does not beat its set's mean field; without it, it does)."""
    return nn.Sequential(nn.Conv3d(cin, cout, 1), nn.ReLU(inplace=True))


def up_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """Transposed convolution doubling each spatial size (k4, s2, p1), BN, ReLU."""
    return nn.Sequential(
        nn.ConvTranspose3d(cin, cout, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the input, ReLU. Keeps channels and spatial size."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(channels)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + x, inplace=True)


def block_means(x: Tensor, grid: int) -> Tensor:
    """(B, C, n, n, n) -> (B, C * grid^3): the mean of each of the grid^3 blocks of (n / grid)^3 voxels."""
    return F.avg_pool3d(x, x.shape[-1] // grid).flatten(1)


def linear_upsample(coarse: Tensor, grid: int, n: int) -> Tensor:
    """(B, C * grid^3) -> (B, C, n, n, n): the block field, trilinearly interpolated between block centres."""
    return F.interpolate(coarse.view(coarse.shape[0], -1, grid, grid, grid), size=(n, n, n), mode="trilinear",
                         align_corners=False)


class Encoder(nn.Module):
    """(B, 3, n, n, n) -> (mu, logvar), each (B, latent_dim)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        b = cfg.base_channels
        widths = [b, 2 * b, 4 * b, 8 * b]
        self.stem = conv_bn_relu(cfg.channels, b, 7, stride=2)
        stages: list[nn.Module] = []
        for i, (width, n_blocks) in enumerate(zip(widths, BLOCKS[cfg.encoder])):
            if i > 0:  # a separate strided convolution between layers: halve size, double channels
                stages.append(conv_bn_relu(widths[i - 1], width, 3, stride=2))
            stages.extend(ResBlock(width) for _ in range(n_blocks))
        self.layers = nn.Sequential(*stages)
        self.squeeze = conv_relu(widths[-1], cfg.bottleneck_channels)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(cfg.flat_dim, cfg.hidden_dim), nn.ReLU(inplace=True))
        self.mu = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        # Start as a (nearly) deterministic autoencoder: sigma = exp(LOGVAR_INIT / 2) = 0.05 for every
        # input. With the default init sigma ~ 1 drowns mu (~0.1) in noise, the decoder learns to ignore
        # z, the encoder gets no gradient and the latent collapses (KL -> 0) within a few hundred steps.
        nn.init.zeros_(self.logvar.weight)
        nn.init.constant_(self.logvar.bias, LOGVAR_INIT)
        self.grid = cfg.linear_grid
        self.linear = nn.Linear(cfg.channels * self.grid**3, cfg.latent_dim) if self.grid else None
        if self.grid:  # the ResNet path starts silent: mu = the linear path's (VAE.init_linear_path)
            nn.init.zeros_(self.mu.weight), nn.init.zeros_(self.mu.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.hidden(self.squeeze(self.layers(self.stem(x))))
        mu = self.mu(h)
        if self.linear is not None:
            mu = mu + self.linear(block_means(x, self.grid))
        return mu, self.logvar(h).clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """(B, latent_dim) -> (B, 3, n, n, n) in (0, 1)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        b, s = cfg.base_channels, cfg.ve_size // 16
        self.shape = (cfg.bottleneck_channels, s, s, s)
        self.dense = nn.Sequential(
            nn.Linear(cfg.latent_dim, cfg.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.hidden_dim, cfg.flat_dim),
            nn.ReLU(inplace=True),
        )
        self.unsqueeze = conv_relu(cfg.bottleneck_channels, 8 * b)
        stages: list[nn.Module] = []
        for width in (4 * b, 2 * b, b):  # n/16 -> n/8 -> n/4 -> n/2
            stages += [up_bn_relu(2 * width, width), ResBlock(width)]
        head = max(b // 2, 4)
        stages += [up_bn_relu(b, head), nn.Conv3d(head, cfg.channels, 3, padding=1)]  # n/2 -> n
        self.layers = nn.Sequential(*stages)
        self.euler = cfg.representation == "euler"
        self.grid, self.n = cfg.linear_grid, cfg.ve_size
        self.linear = nn.Linear(cfg.latent_dim, cfg.channels * self.grid**3) if self.grid else None
        if self.grid:  # the ResNet path starts silent: the output is the linear path's
            nn.init.zeros_(stages[-1].weight), nn.init.zeros_(stages[-1].bias)

    def forward(self, z: Tensor) -> Tensor:
        """Raw output in the representation: Euler in (0, 1) (sigmoid), unnormalised quaternions or harmonics."""
        h = self.dense(z).view(z.shape[0], *self.shape)
        out = self.layers(self.unsqueeze(h))
        if self.linear is not None:
            out = out + linear_upsample(self.linear(z), self.grid, self.n)
        return torch.sigmoid(out) if self.euler else out


class VAE(nn.Module):
    """The 3D ResNet VAE. ``forward(x) -> (x_hat, mu, logvar)``; fingerprint = ``encode(x)[0]``.

    ``encode`` takes and ``decode`` returns the normalised Euler field ``(B, 3, n, n, n)`` whatever the
    representation, so evaluation and fingerprints do not depend on it. Inside, a ``quaternion`` VAE
    works on fundamental-zone quaternion fields ``(B, 4, n, n, n)`` (:meth:`represent`, :meth:`decode_raw`);
    ``forward`` returns the reconstruction in the representation (what :func:`vae_loss` compares with
    ``represent(x)``)."""

    def __init__(self, cfg: VAEConfig | None = None, **kwargs: int | str) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else VAEConfig(**kwargs)  # type: ignore[arg-type]
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def represent(self, x: Tensor) -> Tensor:
        """Normalised Euler field (B, 3, n, n, n) -> the network's input/target (B, C, n, n, n)."""
        if self.cfg.representation == "euler":
            return x
        if self.cfg.representation == "harmonics":
            return whitened_field(euler_field_to_quaternion(x.float()), self.cfg.crystal).to(x.dtype)
        return euler_field_to_quaternion(x.float(), self.cfg.crystal).to(x.dtype)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x) for a normalised Euler field x; ``mu`` is the fingerprint."""
        return self.encode_raw(self.represent(x))

    def encode_raw(self, r: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of an input already in the representation (:meth:`represent`)."""
        return self.encoder(r)

    def decode_raw(self, z: Tensor) -> Tensor:
        """(B, C, n, n, n) reconstruction in the representation."""
        return self.decoder(z)

    def decode(self, z: Tensor) -> Tensor:
        """(B, 3, n, n, n) normalised Euler field in [0, 1] (fundamental zone for quaternions and harmonics;
        harmonics are decoded to the nearest orientation, :class:`microfp.harmonics.NearestOrientation`)."""
        out = self.decoder(z)
        if self.cfg.representation == "euler":
            return out
        if self.cfg.representation == "harmonics":
            flat = out.float().movedim(1, -1).reshape(-1, out.shape[1])
            q = nearest_orientation(self.cfg.crystal)(flat).view(*out.shape[:1], *out.shape[2:], 4).movedim(-1, 1)
            return quaternion_field_to_euler(q, self.cfg.crystal)
        return quaternion_field_to_euler(out, self.cfg.crystal)

    @torch.no_grad()
    def init_linear_path(self, blocks: Tensor) -> int:
        """Set the linear path to the principal components of training block means; returns how many.

        ``blocks`` (N, C * linear_grid^3): :func:`block_means` of training VEs in the representation.
        The encoder maps a VE's block means to their first ``latent_dim`` principal coordinates, all
        divided by one scale (their root-mean-square deviation: unit variance on average over the
        training set, as the prior, while the coordinates keep PCA's order of importance), the decoder
        maps them back (times the scale, plus the mean): at the start of training the VAE is the
        best linear autoencoder of the block means (PCA), and the ResNet, silent at the start, learns
        what PCA misses. Without this the linear path is learnt too, but from scratch (issue 11: a few
        % of the variance in the default profile's 192 steps). Deterministic (an SVD in float64)."""
        enc, dec = self.encoder.linear, self.decoder.linear
        if enc is None or dec is None:
            raise ValueError("init_linear_path needs linear_grid > 0")
        x = blocks.double().flatten(1)
        mean = x.mean(0)
        _, sv, vt = torch.linalg.svd(x - mean, full_matrices=False)
        k = min(self.cfg.latent_dim, int((sv > sv[0] * 1e-6).sum()))
        scale = (sv[:k].square().mean() / max(len(x) - 1, 1)).sqrt()
        w_enc = torch.zeros_like(enc.weight, dtype=torch.float64)
        w_enc[:k] = vt[:k] / scale
        enc.weight.copy_(w_enc), enc.bias.copy_(-(w_enc @ mean))
        w_dec = torch.zeros_like(dec.weight, dtype=torch.float64)
        w_dec[:, :k] = vt[:k].T * scale
        dec.weight.copy_(w_dec), dec.bias.copy_(mean)
        return k

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I) drawn per sample and dimension, in training only."""
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``r`` in the representation (:meth:`represent`) -> (reconstruction in it, mu, logvar)."""
        mu, logvar = self.encode_raw(r)
        return self.decode_raw(self.reparameterize(mu, logvar)), mu, logvar


# ---------------------------------------------------------------------------------------------
# Parameter count


def param_count(model: nn.Module | VAEConfig) -> dict[str, int]:
    """Trainable parameters: ``total`` and per part (``encoder_conv``, ``encoder_dense``,
    ``decoder_dense``, ``decoder_conv``). Accepts a config (counted on the meta device, no memory)."""
    if isinstance(model, VAEConfig):
        with torch.device("meta"):
            model = VAE(model)
    assert isinstance(model, VAE)

    def count(*modules: nn.Module) -> int:
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    enc, dec = model.encoder, model.decoder
    parts = {
        "encoder_conv": count(enc.stem, enc.layers, enc.squeeze),
        "encoder_dense": count(enc.hidden, enc.mu, enc.logvar, enc.linear),
        "decoder_dense": count(dec.dense, dec.linear),
        "decoder_conv": count(dec.unsqueeze, dec.layers),
    }
    parts["total"] = sum(parts.values())
    return parts


def dense_param_formula(cfg: VAEConfig) -> int:
    """Closed form of the dense parameters (both dense parts), for checks and the docs."""
    f, h, z = cfg.flat_dim, cfg.hidden_dim, cfg.latent_dim
    encoder = (f * h + h) + 2 * (h * z + z)
    decoder = (z * h + h) + (h * f + f)
    blocks = cfg.channels * cfg.linear_grid**3  # the linear path (0 when off)
    return encoder + decoder + ((2 * blocks * z + z + blocks) if blocks else 0)


# ---------------------------------------------------------------------------------------------
# Loss (pure functions of tensors; computed in float32 even under autocast)
#
# Reductions: every term is a mean, so that it does not grow with the batch size, and every term is
# normalised so that its weight (alpha, beta) means the same at every ve_size: as at the paper's 64^3.
#   bce  : eq. 2 of the paper divided by m, i.e. the mean over all B * 3 * n^3 elements.
#   fft  : eq. 3 of the paper, (1/m) sum_j |F(x)_j - F(x_hat)_j|^2 over the unnormalised 3D FFT of each
#          sample and channel (fft_mse), which by Parseval is n^3 * MSE(x, x_hat); vae_loss scales it by
#          64^3 / n^3, i.e. it is 64^3 * MSE at every ve_size: the paper's term at 64^3 (hence its
#          alpha = 0.999), the same per-voxel weight at 32^3 (unscaled it would weigh 8x less there).
#          The reference code's fftshift is a permutation of the modes and does not change this MSE.
#   mse  : (harmonics representation) mean over voxels and channels of the squared difference of the
#          whitened harmonics (unit variance per channel over random orientations): per voxel.
#   mis  : (quaternion representation) mean over voxels of 1 - cos(omega / 2), omega the disorientation
#          reduced by the crystal symmetry (cubic 432 / hexagonal 622): the symmetry-aware phi4.
#   kl   : KL(N(mu, sigma^2) || N(0, I)) summed over the latent dimensions (the textbook per-sample
#          KL), divided by the m = 3 * 64^3 elements of the paper's VE and averaged over the batch. At
#          64^3 with alpha = 1 the loss is the negative ELBO per element (beta = 1: the standard VAE);
#          the fixed divisor keeps beta's meaning at other ve_size.

def bce(x_hat: Tensor, x: Tensor, eps: float = 1e-7) -> Tensor:
    """Binary cross-entropy, eq. 2 / m: mean of -[x log x_hat + (1 - x) log(1 - x_hat)].

    ``x_hat`` is the reconstruction (the prediction, in (0, 1)), ``x`` the input VE (the target).
    The reference code swaps them; BCE is not symmetric, and a test catches the swap.
    """
    x_hat = x_hat.float().clamp(eps, 1 - eps)
    x = x.float()
    return -(x * torch.log(x_hat) + (1 - x) * torch.log1p(-x_hat)).mean()


def fft_mse(x_hat: Tensor, x: Tensor) -> Tensor:
    """Spectral loss, eq. 3: mean over elements of |F(x) - F(x_hat)|^2 (real and imaginary parts),
    with F the unnormalised FFT over the last three (spatial) dimensions."""
    diff = torch.fft.fftn(x.float() - x_hat.float(), dim=(-3, -2, -1))  # F is linear
    return (diff.real.square() + diff.imag.square()).mean()


def kl_divergence(mu: Tensor, logvar: Tensor, n_elements: int = 1) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over latent dimensions, divided by ``n_elements``
    (m = 3 n^3 in :func:`vae_loss`, 1 = the textbook per-sample KL), mean over the batch."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.square() - logvar.exp())).sum(dim=-1).mean() / n_elements


def beta_at(epoch: int, beta: float, warmup_epochs: int) -> float:
    """KL weight of an epoch (0-based) with linear warm-up: 0 at epoch 0, ``beta`` from ``warmup_epochs``."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch / warmup_epochs)


def loss_terms(representation: str) -> tuple[str, ...]:
    """Names of the terms :func:`vae_loss` returns for a representation (the columns of the curves)."""
    recon = {"euler": ("bce", "fft"), "quaternion": ("mis",), "harmonics": ("mse",)}[representation]
    return ("loss", "recon", *recon, "kl")


def vae_loss(
    x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, alpha: float = 0.999, beta: float = 1.0,
    representation: str = "euler", crystal: str = "cubic",
) -> dict[str, Tensor]:
    """All terms of a batch: ``loss`` = ``recon`` + beta * ``kl``, with ``recon`` = alpha * ``bce`` +
    (1 - alpha) * ``fft`` (eq. 4, Euler fields (B, 3, n, n, n) in [0, 1]) or ``recon`` = ``mis``
    (quaternion fields (B, 4, n, n, n); ``x`` unit, ``x_hat`` raw) or ``recon`` = ``mse`` (whitened
    harmonics (B, C, n, n, n)). ``mu``, ``logvar`` (B, latent).
    Autocast is switched off here: the terms are computed in float32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        if representation == "euler":
            fft = fft_mse(x_hat, x) * (REF_VOXELS / x[0, 0].numel())
            terms = {"bce": bce(x_hat, x), "fft": fft}
            terms["recon"] = alpha * terms["bce"] + (1 - alpha) * terms["fft"]
        elif representation == "quaternion":
            terms = {"mis": symmetric_misorientation_loss(x_hat, x, crystal)}
            terms["recon"] = terms["mis"]
        elif representation == "harmonics":
            terms = {"mse": F.mse_loss(x_hat.float(), x.float())}
            terms["recon"] = terms["mse"]
        else:
            raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")
        terms["kl"] = kl_divergence(mu, logvar, REF_ELEMENTS)
        terms["loss"] = terms["recon"] + beta * terms["kl"]
    return terms


# ---------------------------------------------------------------------------------------------
# Checkpoints
#
# best.ckpt (what `dvc pull` fetches for evaluate / fingerprint / surrogate) holds the VAE's weights and
# its one architecture dict: {"model_config": VAEConfig.as_dict(), "state_dict": {...}}. Lightning's
# last.ckpt (resume) holds the training state too; its architecture is hyper_parameters["model"].


class CheckpointError(MicrofpError):
    """A checkpoint that is missing, unreadable or of another architecture (one line)."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint dict on the CPU; :class:`CheckpointError` (one line) when missing, corrupt or
    not a microfp VAE checkpoint (either form above)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint (run `microfp train` or `dvc pull models/vae`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a damaged file
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    try:
        model_of_checkpoint(ckpt)
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: not a microfp VAE checkpoint (no model config)") from None
    return ckpt


def write_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` of ``obj`` to ``path`` atomically (temp file, then rename), the same bytes on
    every run: torch is given a file object, since given a path it names the zip records after the
    (pid-named) temporary file."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def model_of_checkpoint(ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(model config dict, VAE state dict) of a loaded checkpoint of either form."""
    if "model_config" in ckpt:
        return dict(ckpt["model_config"]), ckpt["state_dict"]
    model = dict(ckpt["hyper_parameters"]["model"])
    state = {k[len("vae.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("vae.")}
    return model, state


def weights_only_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The reader's checkpoint of a Lightning one: weights (contiguous CPU copies) and model config."""
    model, state = model_of_checkpoint(ckpt)
    return {"model_config": model, "state_dict": {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}}


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> "VAE":
    """The :class:`VAE` of a checkpoint, rebuilt from its one model config, CPU, eval mode.

    ``expect``: architecture fields that must match (e.g. those of params.yaml); the first difference
    is a :class:`CheckpointError` like ``best.ckpt: trained with latent_dim=64, params.yaml has 512``.
    """
    path = Path(path)
    model, state = model_of_checkpoint(read_checkpoint(path))
    for key, want in (expect or {}).items():
        if model.get(key, VAEConfig.__dataclass_fields__[key].default) != want:
            have = model.get(key, VAEConfig.__dataclass_fields__[key].default)
            raise CheckpointError(f"{path}: trained with {key}={have}, params.yaml has {want}")
    try:
        vae = VAE(VAEConfig(**model))
        vae.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError) as err:
        reason = str(err).splitlines()[0][:200]
        raise CheckpointError(f"{path}: weights do not fit the stored architecture ({reason})") from None
    return vae.eval()


def model_config(params: Params, crystal: str = "cubic") -> VAEConfig:
    """The architecture the parameters ask for (``crystal`` comes from the training data)."""
    t = params.train
    return VAEConfig(
        encoder=params.encoder,
        ve_size=params.ve_size,
        latent_dim=params.latent_dim,
        hidden_dim=t.hidden_dim,
        base_channels=t.base_channels,
        bottleneck_channels=t.bottleneck_channels,
        representation=t.representation,
        crystal=crystal,
        linear_grid=t.linear_grid,
    )


def architecture_of_params(params: Params) -> dict[str, Any]:
    """The architecture fields of :func:`model_config` a checkpoint must match (all but the crystal
    family, which comes from the data)."""
    arch = model_config(params).as_dict()
    arch.pop("crystal")
    return arch


def load_vae(checkpoint_path: str | Path, expect: Params | None = None, device: torch.device | str | None = None) -> VAE:
    """The trained :class:`VAE` of a checkpoint (:func:`load_checkpoint`) in eval mode, on ``device``
    (default the CPU). With ``expect``, the architecture stored in the checkpoint must equal that of
    the parameters, or :class:`CheckpointError` names the first difference, e.g.
    ``models/vae/best.ckpt: trained with latent_dim=64, params.yaml has 512``."""
    vae = load_checkpoint(checkpoint_path, None if expect is None else architecture_of_params(expect))
    return vae if device is None else vae.to(device).eval()


__all__ = [
    "CheckpointError",
    "architecture_of_params",
    "load_checkpoint",
    "load_vae",
    "model_config",
    "model_of_checkpoint",
    "read_checkpoint",
    "weights_only_checkpoint",
    "BLOCKS",
    "VAE",
    "VAEConfig",
    "bce",
    "beta_at",
    "dense_param_formula",
    "fft_mse",
    "kl_divergence",
    "loss_terms",
    "param_count",
    "vae_loss",
]
