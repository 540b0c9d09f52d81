"""The normalisation of the distillation target, as a setting (``target_norm``; train.py's ``--target-norm``).

The teacher's tokens ``t`` [..., C] (after grid matching, ``fd_ref.method.distill``) are normalised before the
student regresses them. Three choices:

    whiten  y = (t - mean_c t) / sqrt(var_c t + eps)        per token, over its C channels: the paper's
                                                            feature whitening (Sec. 3.1), the default
    none    y = t                                           the raw features (the paper's ablation)
    phi_s   y = (1 / a) * H @ U^T @ (t - mu)                PHI-S (Ranzinger et al. 2024, arXiv 2410.01680)

PHI-S ("PCA-Hadamard isotropic standardisation") uses statistics of the teacher's tokens over a sample of
the training images, estimated once before training: mean ``mu`` and covariance ``S = U diag(l) U^T``
(eigen-decomposition). ``U^T (t - mu)`` decorrelates the channels (variances ``l``, very unequal: a few
principal directions hold most of the energy); the normalised Hadamard matrix ``H`` (entries +-1/sqrt(C),
``H H^T = I``) rotates that eigenbasis so that every output channel receives exactly ``1/C`` of each
eigenvalue, so every channel has the same variance ``mean(l)``; one scale ``a = sqrt(mean(l))`` makes it 1.
The transform is therefore orthogonal up to one scale (``a^2 M M^T = I`` for ``M = H U^T / a``), keeps
the geometry of the teacher's distribution, and inverts exactly: ``t = mu + a U H^T y``.

A real Hadamard matrix of order C exists only for C = 1, 2 or a multiple of 4; :func:`hadamard` builds the
orders 2^k * m with m = 1, q + 1 (q prime, q = 3 mod 4: Paley I) or 2 (q + 1) (q prime, q = 1 mod 4:
Paley II), which covers every common width (192 = 12 * 16, 384, 768 = 12 * 64, 1024, 1280 = 20 * 64, 1536).

Imports torch only.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from fd_ref.method.whitening import whiten

TARGET_NORMS = ("whiten", "none", "phi_s")


# --------------------------------------------------------------------------------------- Hadamard matrices
def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) for the quadratic character chi of the field of q elements (q prime)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int) -> torch.Tensor | None:
    """An unnormalised Hadamard matrix of order ``m`` from a Paley construction, or ``None``."""
    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: H = I + S, S = [[0, 1^T], [-1, Q]] skew-symmetric
        s = torch.zeros(m, m, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.float64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix C
        c = torch.zeros(m // 2, m // 2, dtype=torch.float64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, a) + torch.kron(torch.eye(m // 2, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor:
    """The normalised Hadamard matrix of order ``n`` (float64, entries +-1/sqrt(n), ``H @ H.T = I``):
    Sylvester doubling (a Kronecker product with [[1, 1], [1, -1]]) of a Paley matrix (module docstring).
    Raises ``ValueError`` (one line) for an order none of these constructions reaches."""
    if n < 1:
        raise ValueError(f"a Hadamard matrix needs a positive order, got {n}")
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    power = 0
    while n % (1 << power) == 0:
        m = n >> power
        h = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
        if h is not None:
            for _ in range(power):
                h = torch.kron(sylvester, h)
            return h / math.sqrt(n)
        power += 1
    raise ValueError(f"no Hadamard matrix of order {n} can be built (fd-ref builds 1, 2 and 2^k * m with "
                     f"m = q + 1 for a prime q = 3 mod 4, or m = 2 (q + 1) for a prime q = 1 mod 4); PHI-S "
                     f"needs one of the teacher's width: use --target-norm whiten or none")


# ------------------------------------------------------------------------------------ the three choices
class Whiten(nn.Module):
    """``whiten``: per-token LayerNorm without affine (fd_ref.method.whitening). No state."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return whiten(t)


class NoNorm(nn.Module):
    """``none``: the teacher's features as they are (in float32). No state."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()


class PhiS(nn.Module):
    """``phi_s``: y = M (t - mu), M = H U^T / a (module docstring). ``mean``, ``matrix`` [C, C],
    ``scale`` (``a``; estimated in float64, kept in float32) and ``count`` (tokens the estimate used; 0 = not estimated yet) are buffers, so they
    travel in checkpoint.pt and a resumed run does not estimate them again."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.rotation = hadamard(width)  # raises, with one line, for a width without a Hadamard matrix
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("matrix", torch.eye(width))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    @property
    def fitted(self) -> bool:
        return int(self.count) > 0

    @torch.no_grad()
    def fit(self, samples: Iterable[torch.Tensor]) -> "PhiS":
        """Estimate mu and S from tokens [..., C] (an iterable of batches), then set M = H U^T / a with
        a = sqrt(mean eigenvalue of S)."""
        moments = Moments(self.mean.numel())
        for t in samples:
            moments.add(t)
        return self.fit_moments(moments)

    @torch.no_grad()
    def fit_moments(self, moments: "Moments") -> "PhiS":
        mu, cov, n = moments.mean_cov()
        eigvals, eigvecs = torch.linalg.eigh(cov)
        scale = eigvals.clamp_min(0).mean().sqrt().clamp_min(1e-12)
        self.mean.copy_(mu)
        self.matrix.copy_(self.rotation @ eigvecs.T / scale)
        self.scale.copy_(scale)
        self.count.fill_(n)
        return self

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return (t.float() - self.mean) @ self.matrix.T

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """t = mu + M^{-1} y with M^{-1} = a^2 M^T (orthogonal up to the scale): a prediction in the
        normalised space back in the teacher's own."""
        return y.float() @ (self.matrix * self.scale ** 2) + self.mean


class Moments:
    """Running sums of tokens [..., C] in float64 (on their device): count, sum and sum of outer products."""

    def __init__(self, width: int) -> None:
        self.width, self.n, self.total, self.outer = width, 0, None, None

    @torch.no_grad()
    def add(self, t: torch.Tensor) -> None:
        x = t.detach().reshape(-1, self.width).double()
        if self.total is None:
            self.total, self.outer = x.new_zeros(self.width), x.new_zeros(self.width, self.width)
        self.total += x.sum(0)
        self.outer += x.T @ x
        self.n += x.shape[0]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean [C], unbiased covariance [C, C], count), on the CPU."""
        if self.n < 2:
            raise ValueError("PHI-S needs at least two teacher tokens to estimate a covariance")
        mu = self.total.cpu() / self.n
        cov = (self.outer.cpu() - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2, self.n


def build_target_norm(name: str, width: int) -> nn.Module:
    """The normalisation ``name`` (``TARGET_NORMS``) of a teacher of ``width`` channels."""
    if name == "whiten":
        return Whiten()
    if name == "none":
        return NoNorm()
    if name == "phi_s":
        return PhiS(width)
    raise ValueError(f"target normalisation must be one of {', '.join(TARGET_NORMS)}, got {name!r}")
