"""The VAE of microfp.model: shapes, sampling, loss terms against hand-computed values, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from microfp.model import (
    BLOCKS,
    VAE,
    VAEConfig,
    bce,
    beta_at,
    block_means,
    dense_param_formula,
    fft_mse,
    kl_divergence,
    param_count,
    vae_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(latent_dim=5, hidden_dim=16, base_channels=4, bottleneck_channels=2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("encoder", sorted(BLOCKS))
@pytest.mark.parametrize("n", [16, 32])
def test_shapes(encoder: str, n: int) -> None:
    vae = VAE(VAEConfig(encoder=encoder, ve_size=n, **TINY))
    x = torch.rand(2, 3, n, n, n)
    with torch.no_grad():
        x_hat, mu, logvar = vae(x)
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (2, 5)
    assert float(x_hat.min()) > 0 and float(x_hat.max()) < 1  # sigmoid output
    # spatial n -> n/16 at the bottleneck
    with torch.no_grad():
        feats = vae.encoder.layers(vae.encoder.stem(x))
    assert feats.shape == (2, 8 * 4, n // 16, n // 16, n // 16)


def test_residual_blocks_per_layer_follow_table_3() -> None:
    from microfp.model import ResBlock

    for encoder, blocks in BLOCKS.items():
        vae = VAE(VAEConfig(encoder=encoder, ve_size=16, **TINY))
        widths = [m.conv1.in_channels for m in vae.encoder.layers if isinstance(m, ResBlock)]
        assert [widths.count(w) for w in (4, 8, 16, 32)] == list(blocks)
    assert BLOCKS == {"resnet12": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def test_any_latent_dim_and_size() -> None:
    vae = VAE(VAEConfig(encoder="resnet12", ve_size=48, latent_dim=3, hidden_dim=7, base_channels=2,
                        bottleneck_channels=1))
    x_hat, mu, _ = vae(torch.rand(2, 3, 48, 48, 48))
    assert x_hat.shape == (2, 3, 48, 48, 48) and mu.shape == (2, 3)
    with pytest.raises(ValueError, match="multiple of 16"):
        VAEConfig(ve_size=40)
    with pytest.raises(ValueError, match="encoder"):
        VAEConfig(encoder="resnet50")


def test_noise_is_per_sample_and_only_in_training() -> None:
    vae = VAE(VAEConfig(encoder="resnet12", ve_size=16, **TINY))
    mu, logvar = torch.zeros(4, 5), torch.zeros(4, 5)
    vae.train()
    z = vae.reparameterize(mu, logvar)
    assert z.shape == (4, 5)
    assert not torch.allclose(z[0], z[1])  # not one eps shared by the batch (the reference code's bug)
    assert z.std() > 0.3
    vae.eval()
    assert torch.equal(vae.reparameterize(mu + 1.5, logvar), mu + 1.5)
    # eval forward is deterministic and decodes mu
    x = torch.rand(2, 3, 16, 16, 16)
    a, mu1, _ = vae(x)
    b, mu2, _ = vae(x)
    assert torch.equal(a, b) and torch.equal(mu1, mu2)
    assert torch.allclose(a, vae.decode(vae.encode(x)[0]))


def test_identical_inputs_get_different_samples_in_training() -> None:
    vae = VAE(VAEConfig(encoder="resnet12", ve_size=16, **TINY)).train()
    x = torch.rand(1, 3, 16, 16, 16).expand(2, -1, -1, -1, -1).contiguous()
    x_hat, mu, _ = vae(x)
    assert torch.allclose(mu[0], mu[1], atol=1e-6)  # BatchNorm in training: same input, same mu
    assert not torch.allclose(x_hat[0], x_hat[1])  # but each sample draws its own eps


# ---------------------------------------------------------------------------------------------
# Loss terms against hand-computed values


def test_bce_hand_value() -> None:
    x_hat = torch.tensor([0.8, 0.4])
    x = torch.tensor([1.0, 0.0])
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert bce(x_hat, x).item() == pytest.approx(expected, rel=1e-6)


def test_bce_takes_reconstruction_as_prediction_not_target() -> None:
    # BCE is not symmetric: bce(x_hat, x) = -mean(x log x_hat + (1-x) log(1-x_hat)).
    x = torch.tensor([0.2, 0.9])  # input VE (target)
    x_hat = torch.tensor([0.5, 0.7])  # reconstruction (prediction)
    right = -(0.2 * math.log(0.5) + 0.8 * math.log(0.5) + 0.9 * math.log(0.7) + 0.1 * math.log(0.3)) / 2
    swapped = -(0.5 * math.log(0.2) + 0.5 * math.log(0.8) + 0.7 * math.log(0.9) + 0.3 * math.log(0.1)) / 2
    assert abs(right - swapped) > 0.05
    assert bce(x_hat, x).item() == pytest.approx(right, rel=1e-6)
    terms = vae_loss(x_hat.view(1, 1, 2, 1, 1), x.view(1, 1, 2, 1, 1), torch.zeros(1, 1), torch.zeros(1, 1), alpha=1.0)
    assert terms["bce"].item() == pytest.approx(right, rel=1e-6)
    # the minimum over x_hat is at x_hat = x (a perfect reconstruction), not at x_hat in {0, 1}
    assert bce(x, x) < bce(x_hat, x)


def test_bce_is_finite_at_saturated_outputs() -> None:
    assert torch.isfinite(bce(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])))


def test_fft_mse_hand_values() -> None:
    # A delta of height 1 at the origin: its FFT is 1 at every one of the 8 modes -> mean 1.
    x = torch.zeros(1, 1, 2, 2, 2)
    x_hat = x.clone()
    x_hat[0, 0, 0, 0, 0] = 1.0
    assert fft_mse(x_hat, x).item() == pytest.approx(1.0)
    # A constant offset c: all energy in the DC mode, (8c)^2 over 8 elements = 8 c^2.
    assert fft_mse(torch.full((1, 1, 2, 2, 2), 0.25), torch.zeros(1, 1, 2, 2, 2)).item() == pytest.approx(0.5)
    # Imaginary parts count: a delta at index 1 of a length-4 axis has F = exp(-i pi k / 2), |F|^2 = 1.
    y = torch.zeros(1, 1, 4, 1, 1)
    y[0, 0, 1] = 1.0
    assert fft_mse(y, torch.zeros_like(y)).item() == pytest.approx(1.0)


def test_fft_mse_is_n3_times_mse_over_spatial_dims_only() -> None:
    x, x_hat = torch.rand(2, 3, 8, 8, 8), torch.rand(2, 3, 8, 8, 8)
    mse = (x - x_hat).square().mean()
    assert fft_mse(x_hat, x).item() == pytest.approx(8**3 * mse.item(), rel=1e-4)
    # per-sample, per-channel FFT: swapping channels of both does not change it, but a FFT over the
    # channel axis would mix them; check against an explicit per-(sample, channel) computation
    f = torch.fft.fftn(x - x_hat, dim=(2, 3, 4))
    explicit = (f.real**2 + f.imag**2).mean()
    assert fft_mse(x_hat, x).item() == pytest.approx(explicit.item(), rel=1e-5)


def test_kl_hand_value() -> None:
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    per_sample = 0.5 * 1.0 + 0.5 * (2.0 - 1.0 - math.log(2.0))
    assert kl_divergence(mu, logvar).item() == pytest.approx(per_sample, rel=1e-6)
    assert kl_divergence(mu, logvar, 10).item() == pytest.approx(per_sample / 10, rel=1e-6)
    # mean over the batch
    assert kl_divergence(torch.cat([mu, 0 * mu]), torch.cat([logvar, 0 * logvar])).item() == pytest.approx(per_sample / 2)
    assert kl_divergence(torch.zeros(3, 4), torch.zeros(3, 4)).item() == 0.0


def test_vae_loss_normalises_kl_by_the_elements_of_the_paper_ve() -> None:
    # beta = 1, alpha = 1: at 64^3 the loss is the negative ELBO (summed BCE + per-sample KL) per element;
    # the KL divisor stays 3 * 64^3 at other sizes, so beta means the same at every ve_size
    for n in (4, 64):
        x, x_hat = torch.rand(2, 3, n, n, n), torch.rand(2, 3, n, n, n).clamp(0.05, 0.95)
        mu, logvar = torch.randn(2, 6), torch.randn(2, 6)
        t = vae_loss(x_hat, x, mu, logvar, alpha=1.0, beta=1.0)
        bce_sum = torch.nn.functional.binary_cross_entropy(x_hat, x, reduction="sum") / 2
        kl_sum = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).sum() / 2
        expected = bce_sum.item() / (3 * n**3) + kl_sum.item() / (3 * 64**3)
        assert t["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_vae_loss_combines_terms() -> None:
    x, x_hat = torch.rand(2, 3, 4, 4, 4), torch.rand(2, 3, 4, 4, 4).clamp(0.05, 0.95)
    mu, logvar = torch.randn(2, 6), torch.randn(2, 6)
    t = vae_loss(x_hat, x, mu, logvar, alpha=0.9, beta=0.3)
    fft_at_64 = fft_mse(x_hat, x).item() * 64**3 / 4**3  # the FFT term per voxel, at the paper's 64^3
    assert t["recon"].item() == pytest.approx(0.9 * bce(x_hat, x).item() + 0.1 * fft_at_64, rel=1e-5)
    assert t["loss"].item() == pytest.approx(t["recon"].item() + 0.3 * kl_divergence(mu, logvar, 3 * 64**3).item(), rel=1e-5)
    # the mean reductions do not grow with the batch
    t2 = vae_loss(torch.cat([x_hat, x_hat]), torch.cat([x, x]), torch.cat([mu, mu]), torch.cat([logvar, logvar]), 0.9, 0.3)
    assert t2["loss"].item() == pytest.approx(t["loss"].item(), rel=1e-5)


@pytest.mark.parametrize("representation", ["euler", "quaternion", "harmonics"])
def test_loss_of_the_same_ve_pair_is_independent_of_ve_size(representation: str) -> None:
    # The same pair of VEs at 16^3 and at 32^3 (every voxel repeated 2 x 2 x 2): same loss terms.
    x16 = torch.rand(2, 3, 16, 16, 16)
    x_hat16 = (x16 + 0.2 * torch.randn_like(x16)).clamp(0.02, 0.98)
    up = lambda t: t.repeat_interleave(2, 2).repeat_interleave(2, 3).repeat_interleave(2, 4)  # noqa: E731
    mu, logvar = torch.randn(2, 5), torch.randn(2, 5)
    terms = {}
    for n, (x, x_hat) in ((16, (x16, x_hat16)), (32, (up(x16), up(x_hat16)))):
        vae = VAE(VAEConfig(encoder="resnet12", ve_size=n, representation=representation, **TINY))
        r, r_hat = vae.represent(x), vae.represent(x_hat)
        terms[n] = vae_loss(r_hat, r, mu, logvar, alpha=0.9, beta=0.1, representation=representation)
    for key, value in terms[16].items():
        assert terms[32][key].item() == pytest.approx(value.item(), rel=1e-4), key
    assert terms[16]["recon"].item() > 0.01  # a real difference, not two zeros


def test_quaternion_vae_reads_and_returns_euler_fields() -> None:
    vae = VAE(VAEConfig(encoder="resnet12", ve_size=16, representation="quaternion", crystal="hexagonal", **TINY)).eval()
    x = torch.rand(2, 3, 16, 16, 16)
    r = vae.represent(x)
    assert r.shape == (2, 4, 16, 16, 16)
    assert torch.allclose(r.norm(dim=1), torch.ones(2, 16, 16, 16), atol=1e-5)
    x_hat = vae.decode(vae.encode(x)[0])
    assert x_hat.shape == x.shape and float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1


@pytest.mark.parametrize("crystal,channels", [("cubic", 9), ("hexagonal", 18)])
def test_harmonics_vae_reads_and_returns_euler_fields(crystal: str, channels: int) -> None:
    vae = VAE(VAEConfig(encoder="resnet12", ve_size=16, representation="harmonics", crystal=crystal, **TINY)).eval()
    x = torch.rand(2, 3, 16, 16, 16)
    r = vae.represent(x)
    assert r.shape == (2, channels, 16, 16, 16)
    x_hat = vae.decode(vae.encode(x)[0])
    assert x_hat.shape == x.shape and float(x_hat.min()) >= 0 and float(x_hat.max()) <= 1


def test_linear_path_starts_as_the_pca_of_the_block_means() -> None:
    # latent >= the rank of the block means: the initialised VAE returns every training VE's block
    # field exactly (the ResNet path starts silent), interpolated between block centres.
    cfg = VAEConfig(encoder="resnet12", ve_size=16, representation="harmonics", linear_grid=2, **{**TINY, "latent_dim": 12})
    vae = VAE(cfg).eval()
    x = torch.rand(6, 3, 16, 16, 16)
    r = vae.represent(x)
    blocks = block_means(r.double(), 2)
    assert vae.init_linear_path(blocks) == 5  # 6 VEs around their mean: rank 5
    out = vae.decode_raw(vae.encode_raw(r)[0])
    expected = torch.nn.functional.interpolate(blocks.float().view(6, 9, 2, 2, 2), size=(16, 16, 16), mode="trilinear")
    assert torch.allclose(out, expected, atol=1e-4)
    mu = vae.encode_raw(r)[0]
    assert float(mu[:, 5:].abs().max()) == 0.0  # unused latent dimensions stay 0
    assert mu[:, :5].square().mean().item() == pytest.approx(5 / 6, rel=1e-3)  # unit variance on average


def test_vae_loss_is_float32_under_bf16_autocast() -> None:
    x = torch.rand(1, 3, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = vae_loss(x.bfloat16().clamp(0.01, 0.99), x, torch.zeros(1, 2).bfloat16(), torch.zeros(1, 2))
    assert all(v.dtype == torch.float32 for v in t.values())


def test_beta_warmup() -> None:
    assert beta_at(0, 2.0, 0) == 2.0
    assert [beta_at(e, 2.0, 4) for e in range(6)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0]


# ---------------------------------------------------------------------------------------------
# Parameter counts


def _conv_formula(cfg: VAEConfig) -> tuple[int, int]:
    """Encoder and decoder convolution parameters in closed form (3D kernels, BN weight + bias)."""
    b, c = cfg.base_channels, cfg.bottleneck_channels
    block = lambda w: 2 * (27 * w * w + 2 * w)  # noqa: E731 - two conv+BN, no conv bias
    widths = [b, 2 * b, 4 * b, 8 * b]
    enc = 343 * 3 * b + 2 * b  # stem k7
    enc += sum(n * block(w) for n, w in zip(BLOCKS[cfg.encoder], widths))
    enc += sum(27 * widths[i] * widths[i + 1] + 2 * widths[i + 1] for i in range(3))  # strided convs
    enc += 8 * b * c + c  # 1x1 squeeze (bias, no BN)
    head = max(b // 2, 4)
    dec = c * 8 * b + 8 * b  # 1x1 unsqueeze (bias, no BN)
    dec += sum(64 * 2 * w * w + 2 * w + block(w) for w in (4 * b, 2 * b, b))  # ConvT k4 + BN + ResBlock
    dec += 64 * b * head + 2 * head + 27 * head * 3 + 3  # last ConvT, final conv (with bias)
    return enc, dec


@pytest.mark.parametrize("encoder", sorted(BLOCKS))
def test_param_count_matches_formula(encoder: str) -> None:
    cfg = VAEConfig(encoder=encoder, ve_size=32, latent_dim=7, hidden_dim=24, base_channels=4, bottleneck_channels=3)
    vae = VAE(cfg)
    counts = param_count(vae)
    assert counts["total"] == sum(p.numel() for p in vae.parameters())
    assert counts == param_count(cfg)  # the meta-device count of a config is the same
    assert counts["encoder_dense"] + counts["decoder_dense"] == dense_param_formula(cfg)
    f = 3 * 2**3
    assert counts["encoder_dense"] == f * 24 + 24 + 2 * (24 * 7 + 7)
    enc, dec = _conv_formula(cfg)
    assert (counts["encoder_conv"], counts["decoder_conv"]) == (enc, dec)


def test_param_count_formula_with_the_linear_path() -> None:
    cfg = VAEConfig(encoder="resnet12", ve_size=16, latent_dim=7, hidden_dim=24, base_channels=4, bottleneck_channels=3,
                    representation="harmonics", linear_grid=2)
    counts = param_count(VAE(cfg))
    assert counts["encoder_dense"] + counts["decoder_dense"] == dense_param_formula(cfg)
    assert dense_param_formula(cfg) - dense_param_formula(VAEConfig(**{**cfg.as_dict(), "linear_grid": 0})) == 2 * (72 * 7) + 7 + 72


def test_paper_scale_param_counts_are_lean() -> None:
    # 64^3, latent 256, hidden 8192: the reference code has ~606M parameters, ~537M of them in two
    # dense 32768 x 8192 layers. The 1x1 squeeze to 32 channels (2048 features) keeps hidden = 8192.
    totals = {}
    for encoder in BLOCKS:
        cfg = VAEConfig(encoder=encoder, ve_size=64, latent_dim=256, hidden_dim=8192)
        counts = param_count(cfg)
        assert counts["total"] == sum(counts[k] for k in counts if k != "total")
        assert counts["encoder_dense"] == 2048 * 8192 + 8192 + 2 * (8192 * 256 + 256)
        totals[encoder] = counts["total"]
    assert totals["resnet12"] < totals["resnet18"] < totals["resnet34"] < 150e6


def test_channels_last_gives_the_same_output() -> None:
    vae = VAE(VAEConfig(encoder="resnet12", ve_size=16, **TINY)).eval()
    x = torch.rand(2, 3, 16, 16, 16)
    ref = vae(x)[0]
    vae.to(memory_format=torch.channels_last_3d)
    out = vae(x.contiguous(memory_format=torch.channels_last_3d))[0]
    assert torch.allclose(ref, out, atol=1e-5)


def test_a_few_steps_fit_one_batch() -> None:
    vae = VAE(VAEConfig(encoder="resnet12", ve_size=16, **TINY))
    x = torch.rand(1, 3, 1, 1, 1).expand(4, 3, 16, 16, 16).contiguous() * 0.8 + 0.1  # constant fields
    opt = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        x_hat, mu, logvar = vae(x)
        loss = vae_loss(x_hat, x, mu, logvar, beta=0.0)["recon"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_a_linear_grid_that_does_not_divide_ve_size_is_a_one_line_error(default_raw: dict) -> None:
    """Rejected by the parameter schema, so every stage (not only those that build a model) stops."""
    from microfp.config import parse_params
    from microfp.errors import MicrofpError

    default_raw["train"]["linear_grid"] = 5
    with pytest.raises(MicrofpError, match=r"^params.yaml: train.linear_grid: must be 0 or divide ve_size \(32\), got 5$"):
        parse_params(default_raw, "params.yaml")
