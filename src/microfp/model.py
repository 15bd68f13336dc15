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
             squeeze   conv k1, 8b -> c                        (the lean bottleneck, see below)
             flatten -> Linear(c s^3, hidden) -> ReLU -> Linear(hidden, latent) twice: mu, ln(sigma^2)
    z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) per sample, only in training; eval: z = mu
    decoder  Linear(latent, hidden) -> ReLU -> Linear(hidden, c s^3) -> ReLU -> conv k1, c -> 8b
             3 x [ConvTranspose k4 s2 (halving channels) + BN + ReLU, ResBlock]   n/16 -> n/2
             ConvTranspose k4 s2, b -> b/2 + BN + ReLU, conv k3, b/2 -> 3, sigmoid        n

ResBlock = conv-BN-ReLU-conv-BN, plus the input (skip), then ReLU (paper section 2.2.2). The blocks per
layer are ``BLOCKS[encoder]`` (Table 3). The fingerprint of a VE is ``mu`` (:meth:`VAE.encode`).

Lean bottleneck: the reference code flattens 512 x 4^3 = 32768 features into two dense 32768 x 8192
layers (~606M parameters at 64^3, ~2.4 GB of fp32 weights). Here a 1x1x1 convolution first squeezes the
channels to ``bottleneck_channels`` (32: 2048 features at 64^3), which keeps the hidden layer of 8192 the
paper specifies while cutting its dense layers ~16x. :func:`param_count` reports the parts.

The loss (:func:`vae_loss`) is ``alpha * BCE + (1 - alpha) * FFT + beta * KL``; see its docstring for the
reductions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCKS: dict[str, tuple[int, int, int, int]] = {
    # Table 3 of the paper: residual blocks in each of the 4 layers.
    "resnet12": (1, 1, 1, 1),
    "resnet18": (2, 2, 2, 2),
    "resnet34": (3, 4, 6, 3),
}


@dataclass(frozen=True)
class VAEConfig:
    """Everything that fixes the architecture (and so the shape of a checkpoint's weights)."""

    encoder: str = "resnet18"
    ve_size: int = 64
    latent_dim: int = 256
    hidden_dim: int = 8192
    base_channels: int = 64
    bottleneck_channels: int = 32

    def __post_init__(self) -> None:
        if self.encoder not in BLOCKS:
            raise ValueError(f"encoder must be one of {', '.join(BLOCKS)}, got {self.encoder!r}")
        if self.ve_size < 16 or self.ve_size % 16:
            raise ValueError(f"ve_size must be a positive multiple of 16, got {self.ve_size}")
        for key in ("latent_dim", "hidden_dim", "base_channels", "bottleneck_channels"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")

    @property
    def flat_dim(self) -> int:
        """Features entering the hidden layer: bottleneck_channels * (ve_size / 16)^3."""
        return self.bottleneck_channels * (self.ve_size // 16) ** 3

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
    )


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


class Encoder(nn.Module):
    """(B, 3, n, n, n) -> (mu, logvar), each (B, latent_dim)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        b = cfg.base_channels
        widths = [b, 2 * b, 4 * b, 8 * b]
        self.stem = conv_bn_relu(3, b, 7, stride=2)
        stages: list[nn.Module] = []
        for i, (width, n_blocks) in enumerate(zip(widths, BLOCKS[cfg.encoder])):
            if i > 0:  # a separate strided convolution between layers: halve size, double channels
                stages.append(conv_bn_relu(widths[i - 1], width, 3, stride=2))
            stages.extend(ResBlock(width) for _ in range(n_blocks))
        self.layers = nn.Sequential(*stages)
        self.squeeze = conv_bn_relu(widths[-1], cfg.bottleneck_channels, 1)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(cfg.flat_dim, cfg.hidden_dim), nn.ReLU(inplace=True))
        self.mu = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        self.logvar = nn.Linear(cfg.hidden_dim, cfg.latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.hidden(self.squeeze(self.layers(self.stem(x))))
        return self.mu(h), self.logvar(h)


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
        self.unsqueeze = conv_bn_relu(cfg.bottleneck_channels, 8 * b, 1)
        stages: list[nn.Module] = []
        for width in (4 * b, 2 * b, b):  # n/16 -> n/8 -> n/4 -> n/2
            stages += [up_bn_relu(2 * width, width), ResBlock(width)]
        head = max(b // 2, 4)
        stages += [up_bn_relu(b, head), nn.Conv3d(head, 3, 3, padding=1)]  # n/2 -> n, 3 channels
        self.layers = nn.Sequential(*stages)

    def forward(self, z: Tensor) -> Tensor:
        h = self.dense(z).view(z.shape[0], *self.shape)
        return torch.sigmoid(self.layers(self.unsqueeze(h)))


class VAE(nn.Module):
    """The 3D ResNet VAE. ``forward(x) -> (x_hat, mu, logvar)``; fingerprint = ``encode(x)[0]``."""

    def __init__(self, cfg: VAEConfig | None = None, **kwargs: int | str) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else VAEConfig(**kwargs)  # type: ignore[arg-type]
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of q(z | x); ``mu`` is the fingerprint."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def reparameterize(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I) drawn per sample and dimension, in training only."""
        if not self.training:
            return mu
        return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar


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
        return sum(p.numel() for m in modules for p in m.parameters())

    enc, dec = model.encoder, model.decoder
    parts = {
        "encoder_conv": count(enc.stem, enc.layers, enc.squeeze),
        "encoder_dense": count(enc.hidden, enc.mu, enc.logvar),
        "decoder_dense": count(dec.dense),
        "decoder_conv": count(dec.unsqueeze, dec.layers),
    }
    parts["total"] = sum(parts.values())
    return parts


def dense_param_formula(cfg: VAEConfig) -> int:
    """Closed form of the dense parameters (both dense parts), for checks and the docs."""
    f, h, z = cfg.flat_dim, cfg.hidden_dim, cfg.latent_dim
    encoder = (f * h + h) + 2 * (h * z + z)
    decoder = (z * h + h) + (h * f + f)
    return encoder + decoder


# ---------------------------------------------------------------------------------------------
# Loss (pure functions of tensors; computed in float32 even under autocast)
#
# Reductions: every term is a mean, so that it does not grow with the batch size.
#   bce  : eq. 2 of the paper divided by m, i.e. the mean over all B * 3 * n^3 elements.
#   fft  : eq. 3 of the paper as written, (1/m) sum_j |F(x)_j - F(x_hat)_j|^2 over the unnormalised 3D
#          FFT of each sample and channel, averaged over the batch as well. By Parseval it equals
#          n^3 * MSE(x, x_hat), which is why it is 1e4-1e5 times the BCE at 64^3 and why alpha = 0.999.
#          (Its weight relative to the BCE therefore grows with n^3: 8x smaller at 32^3 than at 64^3.)
#          The reference code's fftshift is a permutation of the modes and does not change this MSE.
#   kl   : KL(N(mu, sigma^2) || N(0, I)) summed over the latent dimensions (the textbook per-sample
#          KL), divided by the same m = 3 n^3 elements of a VE and averaged over the batch. With this
#          1/m the loss is the negative ELBO per element (alpha = 1), so beta = 1 is the standard VAE
#          and beta != 1 a beta-VAE, at any ve_size. (Per latent dimension, beta = 1 weighs the KL by
#          latent_dim / m: 256 / 786432 = 3.3e-4 at 64^3.)


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


def vae_loss(
    x_hat: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, alpha: float = 0.999, beta: float = 1.0
) -> dict[str, Tensor]:
    """All terms: ``loss`` = ``recon`` + beta * ``kl``, ``recon`` = alpha * ``bce`` + (1 - alpha) * ``fft``
    (eq. 4). Autocast is switched off here: the terms are computed in float32."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        m = x[0].numel()  # elements of one VE: 3 n^3
        terms = {"bce": bce(x_hat, x), "fft": fft_mse(x_hat, x), "kl": kl_divergence(mu, logvar, m)}
        terms["recon"] = alpha * terms["bce"] + (1 - alpha) * terms["fft"]
        terms["loss"] = terms["recon"] + beta * terms["kl"]
    return terms


__all__ = [
    "BLOCKS",
    "VAE",
    "VAEConfig",
    "bce",
    "beta_at",
    "dense_param_formula",
    "fft_mse",
    "kl_divergence",
    "param_count",
    "vae_loss",
]
