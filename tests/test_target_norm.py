"""Spec tests of --target-norm (fd_ref.method.target_norm): whiten standardises each token, none is the identity,
PHI-S gives every channel the same variance with a transform orthogonal up to one scale and invertible,
Hadamard matrices of every order fd-ref claims, a one-line error for a width without one, and the PHI-S
statistics estimated once (kept in checkpoint.pt: a resume does not estimate them again)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import train
from fd_ref.errors import UserError
from fd_ref.method.distill import FeatureDistillation
from fd_ref.method.target_norm import NoNorm, PhiS, Whiten, build_target_norm, hadamard
from fd_ref.models.teachers import Teacher
from fd_ref.models.vit import VisionTransformer

# orders built by Sylvester doubling of 1 or of a Paley matrix (q + 1 for q = 3 mod 4, 2(q + 1) for q = 1 mod 4)
BUILDABLE = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 60, 64, 72, 76, 80, 84, 96, 108, 128, 192]
NOT_HADAMARD = [3, 5, 6, 7, 10, 14, 18, 22, 30]  # > 2 and not a multiple of 4: no Hadamard matrix exists


def _tokens(seed, shape, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("n", BUILDABLE)  # every order, not a sample of them
def test_hadamard_is_orthonormal_with_entries_of_one_magnitude(n):
    h = hadamard(n)
    assert h.shape == (n, n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), atol=1e-12)


def test_hadamard_of_order_4_is_the_paley_matrix_written_out():
    """Order 4 = q + 1 for q = 3: H = I + S, S = [[0, 1^T], [-1, Q]], Q[i, j] = chi(j - i) with the squares mod 3
    = {1}, so chi(1) = 1, chi(2) = -1 (by hand: Q = [[0, 1, -1], [-1, 0, 1], [1, -1, 0]]); scaled by 1/2."""
    paley = torch.tensor([[1, 1, 1, 1],
                          [-1, 1, 1, -1],
                          [-1, -1, 1, 1],
                          [-1, 1, -1, 1]], dtype=torch.float64)
    assert torch.equal(hadamard(4), paley / 2)


@pytest.mark.parametrize("n", NOT_HADAMARD)
def test_hadamard_refuses_orders_without_one_in_one_line(n):
    with pytest.raises(ValueError) as err:
        hadamard(n)
    assert "\n" not in str(err.value) and f"order {n}" in str(err.value)


@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), c=st.integers(2, 40),
       scale=st.floats(0.1, 100.0), offset=st.floats(-50, 50), seed=st.integers(0, 2**31 - 1))
def test_whiten_each_token_has_mean_zero_and_variance_one(lead, c, scale, offset, seed):
    t = (_tokens(seed, (*lead, c)) * scale + offset).float()
    y = Whiten()(t).double()
    var_t = t.double().var(-1, unbiased=False)
    assert torch.allclose(y.mean(-1), torch.zeros_like(var_t), atol=1e-4 * (1 + abs(offset) / scale))
    assert torch.allclose(y.var(-1, unbiased=False), var_t / (var_t + 1e-5), atol=2e-3)


@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), c=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_none_is_the_identity(lead, c, seed):
    t = _tokens(seed, (*lead, c), torch.float32) * 7 - 3
    assert torch.equal(NoNorm()(t), t)
    assert torch.equal(NoNorm()(t.bfloat16()), t.bfloat16().float())  # only the dtype of the target changes


def _anisotropic(seed, n, c):
    """n tokens of width c with very unequal, correlated channels (a teacher-like distribution)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g, dtype=torch.float64)
    spectrum = torch.logspace(2, -2, c, dtype=torch.float64)
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * spectrum) @ mix + torch.randn(c, generator=g,
                                                                                                  dtype=torch.float64) * 5


@given(c=st.sampled_from([4, 8, 12, 16, 20, 24, 32]), seed=st.integers(0, 2**31 - 1))
def test_phi_s_output_has_equal_channel_variances_zero_mean(c, seed):
    x = _anisotropic(seed, 40 * c, c)
    phi = PhiS(c).fit([x[: len(x) // 2], x[len(x) // 2:]])  # estimated over two batches
    y = phi(x).double()
    cov = torch.cov(y.T)
    assert torch.allclose(torch.diagonal(cov), torch.ones(c, dtype=torch.float64), atol=2e-3)
    assert torch.allclose(y.mean(0), torch.zeros(c, dtype=torch.float64), atol=2e-3)
    # the raw distribution is far from isotropic (principal variances over orders of magnitude); after
    # PHI-S every channel's variance is the same
    # (compared as a product: the smallest eigenvalue of a nearly singular draw can round to <= 0)
    eig = torch.linalg.eigvalsh(torch.cov(x.T))
    assert eig.max() > 10 * eig.min()


@given(c=st.sampled_from([4, 8, 12, 16, 20, 24, 32]), seed=st.integers(0, 2**31 - 1))
def test_phi_s_is_orthogonal_up_to_its_scale_and_invertible(c, seed):
    x = _anisotropic(seed, 30 * c, c)
    phi = PhiS(c).fit([x])
    m, a = phi.matrix.double(), phi.scale.double()
    assert torch.allclose(a ** 2 * m @ m.T, torch.eye(c, dtype=torch.float64), atol=1e-4)
    # a^2 = the mean eigenvalue of the covariance = its trace / C
    assert torch.allclose(a ** 2, torch.trace(torch.cov(x.T)) / c, rtol=1e-4)
    probe = _anisotropic(seed + 1, 16, c).float()
    back = phi.inverse(phi(probe))
    assert torch.allclose(back, probe, rtol=1e-4, atol=1e-3 * probe.abs().max().item())


def test_hadamard_of_order_28_starts_with_the_paley_two_rows():
    """28 = 2 (q + 1) for q = 13 (27 is no prime): H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]] with the
    conference matrix's first row 0, 1, ..., 1, so H's first two rows are [1, -1] then 13 x [1, 1], and [-1, -1]
    then 13 x [1, -1] (times 1/sqrt(28))."""
    h = hadamard(28) * math.sqrt(28)
    assert torch.allclose(h[0], torch.tensor([1.0, -1.0] + [1.0, 1.0] * 13, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h[1], torch.tensor([-1.0, -1.0] + [1.0, -1.0] * 13, dtype=torch.float64), atol=1e-12)


def test_hadamard_error_messages():
    with pytest.raises(ValueError, match=r"^a Hadamard matrix needs a positive order, got 0$"):
        hadamard(0)
    with pytest.raises(ValueError) as err:
        hadamard(6)
    assert str(err.value) == ("no Hadamard matrix of order 6 can be built (fd-ref builds 1, 2 and 2^k * m with m = q + 1 "
                              "for a prime q = 3 mod 4, or m = 2 (q + 1) for a prime q = 1 mod 4); PHI-S needs one of "
                              "the teacher's width: use --target-norm whiten or none")


def test_phi_s_fitted_from_a_state_of_one_token_and_floored_on_constant_tokens():
    """A saved state is fitted as soon as it counts one token; tokens all alike have no spread, and the scale
    a = sqrt(mean eigenvalue) is floored at 1e-12 instead of dividing by zero."""
    phi = PhiS(4)
    phi.load_state_dict({**phi.state_dict(), "count": torch.tensor(1)})
    assert phi.fitted
    flat = PhiS(4).fit([torch.ones(10, 4)])
    assert float(flat.scale) == pytest.approx(1e-12, rel=1e-6, abs=0)  # approx's default abs is 1e-12
    assert torch.equal(flat(torch.ones(3, 4)), torch.zeros(3, 4))


def test_phi_s_estimates_from_two_tokens_and_refuses_one():
    """Two tokens are the fewest with a covariance (unbiased, n - 1 = 1): the estimate's scale is that of
    torch.cov; one token is refused with the whole message, as is an unknown normalisation."""
    x = torch.tensor([[1.0, 2.0, 0.0, -1.0], [3.0, -2.0, 1.0, 1.0]], dtype=torch.float64)
    phi = PhiS(4).fit([x])
    assert int(phi.count) == 2
    assert float(phi.scale) ** 2 == pytest.approx(float(torch.trace(torch.cov(x.T))) / 4, rel=1e-6)
    with pytest.raises(ValueError, match=r"^PHI-S needs at least two teacher tokens to estimate a covariance$"):
        PhiS(4).fit([x[:1]])
    with pytest.raises(ValueError, match=r"^target normalisation must be one of whiten, none, phi_s, got 'batch'$"):
        build_target_norm("batch", 4)


def test_phi_s_state_is_buffers_and_unfitted_until_estimated():
    phi = PhiS(8)
    assert not phi.fitted and set(phi.state_dict()) == {"mean", "matrix", "scale", "count"}
    phi.fit([torch.randn(64, 8)])
    assert phi.fitted and int(phi.count) == 64
    assert set(build_target_norm("whiten", 8).state_dict()) == set(build_target_norm("none", 8).state_dict()) == set()
    with pytest.raises(ValueError):
        build_target_norm("batchnorm", 8)


def _teacher(dim):
    net = VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=1, num_heads=1)
    return Teacher(net, dim, net.grid, 1, name="vit_test")


def _student():
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)


def test_a_teacher_width_without_hadamard_matrix_is_a_one_line_error():
    with pytest.raises(ValueError) as err:
        FeatureDistillation(_student(), _teacher(10), target_norm="phi_s")
    assert "\n" not in str(err.value) and "vit_test (10 channels)" in str(err.value) and "Hadamard" in str(err.value)
    FeatureDistillation(_student(), _teacher(10), target_norm="whiten")  # the other settings take any width


def test_phi_s_target_is_float32_in_a_bf16_run():
    """Under bf16 autocast (a bf16 run's forward) the PHI-S target is computed in float32, like the
    whitened one: it equals the float64 formula y = M (t - mu) on the same teacher tokens to float32
    precision, where a bf16 product would be off by bf16's rounding (~0.3% per token at width 768)."""
    torch.manual_seed(0)
    fd = FeatureDistillation(_student(), _teacher(64), target_norm="phi_s")
    fd.target_norm.fit([torch.randn(256, 64) * torch.linspace(0.1, 3.0, 64) + 1.0])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = fd.teacher_tokens(x)
        target = fd.targets(x)
    phi = fd.target_norm
    hand = (t.double() - phi.mean.double()) @ phi.matrix.double().T
    assert target.dtype == torch.float32
    error = ((target.double() - hand).norm(dim=-1) / hand.norm(dim=-1)).max()
    assert error < 1e-5, float(error)


def test_no_whiten_is_an_alias_of_target_norm_none_and_contradictions_are_refused(tmp_path):
    """``--no-whiten`` (flag or ``whiten: false`` in a config) resolves to ``target_norm: none``, the one
    setting; ``--no-whiten`` with another normalisation is refused in one line."""
    from fd_ref.config import resolve_config
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    student, teacher = _student(), _teacher(12)
    assert torch.equal(FeatureDistillation(student, teacher, target_norm="none").targets(x), teacher(x).float())
    resolve = lambda argv: resolve_config(train.DEFAULTS, argv, aliases=train.ALIASES)  # noqa: E731
    assert "whiten" not in resolve([]) and resolve([])["target_norm"] == "whiten"
    assert resolve(["--no-whiten"])["target_norm"] == "none"
    assert resolve(["--whiten", "--target-norm", "phi_s"])["target_norm"] == "phi_s"
    config = tmp_path / "old.yaml"
    config.write_text("whiten: false\n")
    assert resolve(["--config", str(config)])["target_norm"] == "none"
    with pytest.raises(UserError, match="--no-whiten.*--target-norm phi_s"):
        resolve(["--no-whiten", "--target-norm", "phi_s"])


TINY = ["--img-size", "32", "--patch-size", "8", "--depth", "1", "--embed-dim", "16", "--num-heads", "2",
        "--teacher-patch-size", "8", "--teacher-depth", "1", "--synthetic-size", "32", "--num-workers", "0",
        "--progress", "false", "--log-every", "1", "--warmup-epochs", "0", "--batch-size", "8"]


def test_phi_s_estimated_once_and_resumed_from_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "phi"
    flags = TINY + ["--target-norm", "phi_s", "--phi-s-images", "16", "--epochs", "2", "--output", str(out)]
    train.main(flags + ["--max-steps", "2"])
    first = capsys.readouterr().out
    assert "PHI-S: teacher mean and covariance estimated on 16 training images" in first
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    assert int(saved["target_norm.count"]) == 16 * 17  # 16 images x (class token + 4x4 patches)
    train.main(flags)  # resumes at step 2: the statistics come from checkpoint.pt
    second = capsys.readouterr().out
    assert "PHI-S" not in second and "resum" in second.lower()
    final = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    for key in ("target_norm.mean", "target_norm.matrix", "target_norm.scale", "target_norm.count"):
        assert torch.equal(final[key], saved[key])


def test_phi_s_estimate_is_the_same_on_every_rank_and_leaves_the_random_streams_alone():
    """fit_phi_s draws its sample and augmentations from its own seed: two processes whose random states
    differ (ranks) estimate the same transform, and the caller's random stream is where it was."""
    from fd_ref.data import pretrain_transform
    from fd_ref.data.splits import train_val_datasets
    from fd_ref.eval.target_fit import fit_phi_s
    dataset, _ = train_val_datasets("synthetic", pretrain_transform(32), None, need_val=False, synthetic_size=24,
                                    img_size=32)
    estimates, teacher = [], _teacher(12)  # the same teacher on every rank
    for rank_seed in (1, 2):
        torch.manual_seed(rank_seed)
        fd = FeatureDistillation(_student(), teacher, target_norm="phi_s")
        before = torch.get_rng_state()
        assert fit_phi_s([fd], dataset, 16, 8, seed=0, device=torch.device("cpu")) == 16
        assert torch.equal(torch.get_rng_state(), before)
        assert fit_phi_s([fd], dataset, 16, 8, seed=0, device=torch.device("cpu")) == 0  # estimated already
        estimates.append(fd.target_norm.state_dict())
    assert all(torch.equal(estimates[0][k], estimates[1][k]) for k in estimates[0])


def test_a_checkpoint_of_an_old_no_whiten_run_resumes(tmp_path, capsys):
    """A checkpoint written when ``--no-whiten`` was its own setting records ``whiten: false`` beside
    ``target_norm: whiten``; the same command resumes it (it is ``target_norm: none`` now)."""
    out = tmp_path / "run"
    flags = TINY + ["--no-whiten", "--epochs", "2", "--output", str(out)]
    train.main(flags + ["--max-steps", "1"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["config"]["target_norm"] == "none" and "whiten" not in ckpt["config"]
    ckpt["config"].update(whiten=False, target_norm="whiten")  # as the older version recorded it
    torch.save(ckpt, out / "checkpoint.pt")
    train.main(flags + ["--max-steps", "2"])
    assert "resumed from" in capsys.readouterr().out
