"""What every VICReg backend shares, stdlib only: the option values, the loss coefficients and the route rule."""
from __future__ import annotations

from dataclasses import dataclass

BACKENDS = ("auto", "torch", "triton")
FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")


@dataclass(frozen=True)
class VICRegCoefficients:
    """Loss weights plus the scale factors of each term, precomputed once per shape.

    ``loss = inv_scale * ||x-y||^2 + var_scale * sum_j hinge_j + cov_scale * sum_{i!=j} M_ij^2``
    (hinge and off-diagonal sums taken over both branches). The gradient factors are
    ``d_inv = 2 inv_scale``, ``d_var = var_scale * s`` (times ``a_j / sigma_j``), ``d_cov = 4 cov_scale``.
    """

    n: int
    d: int
    sim: float = 25.0
    std: float = 25.0
    cov: float = 1.0
    eps: float = 1e-4
    gamma: float = 1.0

    @property
    def inv_nm1(self) -> float:  # s = 1/(N-1), the unbiased-variance divisor
        return 1.0 / (self.n - 1)

    @property
    def inv_scale(self) -> float:
        return self.sim / (self.n * self.d)

    @property
    def var_scale(self) -> float:  # mean over D, averaged over the two branches
        return self.std / (2.0 * self.d)

    @property
    def cov_scale(self) -> float:
        return self.cov * self.inv_nm1 ** 2 / self.d

    @property
    def d_inv(self) -> float:
        return 2.0 * self.inv_scale

    @property
    def d_var(self) -> float:
        return self.var_scale * self.inv_nm1

    @property
    def d_cov(self) -> float:
        return 4.0 * self.cov_scale


def use_gram_route(n: int, d: int) -> bool:
    """Min-side rule: the N x N Gram when N < D, else the D x D matrix with a masked diagonal."""
    return n < d
