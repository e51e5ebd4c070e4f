"""Triton kernels for the closed-form VICReg loss, the CUDA path (math in ``kernels/vicreg_torch.py``).

Launches (forward: 3 or 4, backward: 1), both branches in each launch (``program_id`` axis "b"):

1. ``_column_stats_kernel``   one pass over x and y for the column means and ``||x-y||^2``, a second,
                              centred pass for ``n2`` (and ``n2r``, see below) that also corrects the
                              mean; per-block partial sums of the invariance and variance terms.
2. ``_small_matrix_kernel``   split-K product of the centred operand with itself, upper-triangular
                              tiles only: ``G = Zc Zc^T`` (N < D) or ``M = Zc^T Zc`` (N >= D). Centring
                              happens on load, in fp32, before the operands are rounded.
   ``_splitk_reduce_kernel``  (only when split > 1) sums the split partials in a fixed order.
   Either of the two ends in ``_small_matrix_epilogue``: mask the diagonal (M route), store the tile
   and its mirror, write the tile's sum of squares.
3. ``_finalize_kernel``       one program: sums every partial in a fixed order into the scalar loss.
4. ``_grad_kernel``           one GEMM per branch, ``G Zc`` or ``Zc M_off``, with an epilogue that adds
                              the invariance and variance terms, scales by the upstream gradient and
                              stores dx / dy in the input dtype.

Every reduction has a fixed order (no atomics), so results are bitwise reproducible.

Numerics: operands of ``tl.dot`` are centred in fp32 first, then rounded to the operand type: bf16
for bf16 inputs, TF32 for fp32 inputs at ``fp32_precision="tf32"`` (rounded to nearest in the kernel by
``_round_tf32``, so the dot reads them exactly, whatever the tensor cores do with the low mantissa bits),
unchanged fp32 at "ieee" / "tf32x3". The m x m matrix saved for the backward is stored rounded the same
way. On the Gram route the loss subtracts ``sum_j n2_j^2`` from ``||G||^2``; ``n2r`` is ``n2`` recomputed
from the *rounded* operands so that the subtracted diagonal matches the one inside G (before TF32 was
rounded here, n2r came from unrounded operands while G used rounded ones: ~1e-3 loss error at
(256, 768); docs/vicreg-kernel.md section 5).

Devices: every launch runs under ``torch.cuda.device(x.device)`` (``_device_guard``), since Triton
launches on the *current* CUDA device, not on the one holding the tensors.

Portability: plain pointer arithmetic only (no block pointers / TMA descriptors) and fixed launch
configs (no autotune), so the same code runs on Triton 3.6 and later and under ``TRITON_INTERPRET=1``.
Two interpreter quirks are handled by the ``INTERPRET`` constexpr: its fp32 -> bf16 cast does not
round to nearest (see ``_to_bf16``), and its bf16 ``tl.dot`` is unreliable, so there the rounded
operands go to the dot as fp32 (exact: bf16 x bf16 products are exact in fp32).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import VICRegCoefficients, use_gram_route

# Stats layout per branch: rows of a (3, D) fp32 block.
_MU, _N2, _N2R = 0, 1, 2


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _to_bf16(v, INTERPRET: tl.constexpr):
    """fp32 -> bf16, round to nearest even.

    On the GPU this is the native conversion. The interpreter's fp32 -> bf16 cast truncates (and its
    "rtne" mode is inexact), so there the rounding is done on the bits first; the cast that follows
    is then exact. Inputs are finite, so NaN/inf handling is not needed.
    """
    if INTERPRET:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(tl.bfloat16)


@triton.jit
def _round_tf32(v):
    """fp32 -> the nearest TF32 value (10 mantissa bits, ties away from zero), still stored as fp32.

    The integer form of ``cvt.rna.tf32.f32``: add half of the 13 dropped bits, then clear them. A dot
    with ``input_precision="tf32"`` then reads these values exactly, whether the tensor cores round or
    truncate their inputs (docs/vicreg-kernel.md section 5). Plain integer ops: runs in the interpreter too.
    """
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_operand(v, OP_BF16: tl.constexpr, OP_TF32: tl.constexpr, INTERPRET: tl.constexpr):
    """Round an fp32 tile to the dot operand type: bf16, TF32 (kept in fp32) or fp32 unchanged."""
    if OP_BF16:
        v = _as_operand(_to_bf16(v, INTERPRET), INTERPRET)
    elif OP_TF32:
        v = _round_tf32(v)
    return v


@triton.jit
def _as_operand(v, INTERPRET: tl.constexpr):
    """A tile already in the operand type (bf16 or fp32); the interpreter's dot gets fp32."""
    if INTERPRET:
        v = v.to(tl.float32)
    return v


@triton.jit
def _load_centred(z_ptr, mu_ptr, rows, cols, N, D):
    """fp32 tile ``Zc[rows, cols] = z[rows, cols] - mu[cols]``; zero outside the matrix."""
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    z = tl.load(z_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + cols, mask=cols < D, other=0.0)
    return tl.where(mask, z - mu[None, :], 0.0)


@triton.jit
def _sum_all(ptr, count, BLOCK: tl.constexpr):
    """Deterministic sum of ``count`` fp32 values."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, count, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(ptr + offs, mask=offs < count, other=0.0)
    return tl.sum(acc, axis=0)


# ----------------------------------------------------------------------------------------------
# 1. Column statistics + invariance/variance partials
# ----------------------------------------------------------------------------------------------
@triton.jit
def _centred_second_moments(z_ptr, mu, cols, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            OP_BF16: tl.constexpr, OP_TF32: tl.constexpr, INTERPRET: tl.constexpr):
    """Corrected two-pass moments around the pass-1 mean ``mu``: returns ``(mean, n2, n2r)``.

    ``e = sum(z - mu)`` is the rounding error of the pass-1 mean (times N); with large column means
    it is what limits fp32 accuracy, so the mean becomes ``mu + e/N`` and ``n2 = sum((z-mu)^2) - e^2/N``.
    ``n2r`` is the sum of squares of the operand-rounded ``z - mu`` (the diagonal inside G; its
    O(e^2) shift is far below bf16 rounding).
    """
    n2 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    n2r = tl.zeros((BLOCK_D,), dtype=tl.float32)
    err = tl.zeros((BLOCK_D,), dtype=tl.float32)
    cmask = cols < D
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        mask = (rows < N)[:, None] & cmask[None, :]
        z = tl.load(z_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        zc = tl.where(mask, z - mu[None, :], 0.0)
        zr = _to_operand(zc, OP_BF16, OP_TF32, INTERPRET).to(tl.float32)
        err += tl.sum(zc, axis=0)
        n2 += tl.sum(zc * zc, axis=0)
        n2r += tl.sum(zr * zr, axis=0)
    return mu + err / N, n2 - err * err / N, n2r


@triton.jit
def _column_stats_kernel(x_ptr, y_ptr, stats_ptr, inv_part_ptr, hinge_part_ptr, n2sq_part_ptr,
                         N, D, n_dblocks, inv_nm1, eps, gamma,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         OP_BF16: tl.constexpr, OP_TF32: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D

    # Pass 1: column sums of x and y, and the invariance partial sum_n (x - y)^2.
    sum_x = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sum_y = tl.zeros((BLOCK_D,), dtype=tl.float32)
    sq_diff = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        offs = rows[:, None] * D + cols[None, :]
        mask = (rows < N)[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sum_x += tl.sum(xv, axis=0)
        sum_y += tl.sum(yv, axis=0)
        diff = xv - yv
        sq_diff += tl.sum(diff * diff, axis=0)
    tl.store(inv_part_ptr + pid, tl.sum(sq_diff, axis=0))

    # Pass 2 (two-pass variance: centre first, then square), one branch at a time.
    for b in tl.static_range(2):
        if b == 0:
            z_ptr = x_ptr
            mu = sum_x / N
        else:
            z_ptr = y_ptr
            mu = sum_y / N
        mu, n2, n2r = _centred_second_moments(z_ptr, mu, cols, N, D, BLOCK_N, BLOCK_D, OP_BF16, OP_TF32,
                                              INTERPRET)
        row = stats_ptr + b * 3 * D
        tl.store(row + _MU * D + cols, mu, mask=cmask)
        tl.store(row + _N2 * D + cols, n2, mask=cmask)
        tl.store(row + _N2R * D + cols, n2r, mask=cmask)
        sigma = tl.sqrt(n2 * inv_nm1 + eps)
        hinge = tl.where(cmask, tl.maximum(gamma - sigma, 0.0), 0.0)
        tl.store(hinge_part_ptr + b * n_dblocks + pid, tl.sum(hinge, axis=0))
        tl.store(n2sq_part_ptr + b * n_dblocks + pid, tl.sum(n2r * n2r, axis=0))


# ----------------------------------------------------------------------------------------------
# 2. The small m x m matrix, split-K over the long side
# ----------------------------------------------------------------------------------------------
@triton.jit
def _small_matrix_epilogue(acc, mat_ptr, sumsq_ptr, ti, tj, M, GRAM: tl.constexpr, BM: tl.constexpr,
                           OP_BF16: tl.constexpr, OP_TF32: tl.constexpr, INTERPRET: tl.constexpr):
    """Store tile (ti, tj) of the symmetric m x m matrix and its mirror; write its sum of squares.

    The sum of squares uses the fp32 accumulator. The stored matrix is only the backward's GEMM
    operand, so it is stored already rounded to the operand type (half the bytes for bf16).
    """
    offs_i = ti * BM + tl.arange(0, BM)
    offs_j = tj * BM + tl.arange(0, BM)
    if not GRAM:  # mask, never subtract, the diagonal of M (docs/vicreg-kernel.md section 3)
        acc = tl.where(offs_i[:, None] == offs_j[None, :], 0.0, acc)
    weight = tl.where(ti == tj, 1.0, 2.0)  # an off-diagonal tile stands for itself and its mirror
    tl.store(sumsq_ptr, weight * tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    mask = (offs_i < M)[:, None] & (offs_j < M)[None, :]
    if OP_BF16:
        acc = _to_bf16(acc, INTERPRET)
    elif OP_TF32:  # the backward's dot then reads it exactly, like its other (rounded) operand
        acc = _round_tf32(acc)
    tl.store(mat_ptr + offs_i[:, None] * M + offs_j[None, :], acc, mask=mask)
    tl.store(mat_ptr + offs_j[None, :] * M + offs_i[:, None], acc, mask=mask)  # mirror tile (tj, ti)


@triton.jit
def _small_matrix_kernel(x_ptr, y_ptr, stats_ptr, tile_i_ptr, tile_j_ptr, ws_ptr, mat_ptr, sumsq_ptr,
                         N, D, M, K, k_per_split, n_tiles, n_split,
                         GRAM: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                         OP_BF16: tl.constexpr, OP_TF32: tl.constexpr, INTERPRET: tl.constexpr,
                         PRECISION: tl.constexpr, FUSED_EPILOGUE: tl.constexpr):
    """Partial ``sum_k A[k, I]^T A[k, J]`` over one K-split, for upper tile ``(I, J)``.

    GRAM: ``G[I, J] = sum_k Zc[I, k] Zc[J, k]`` (k over D); else ``M[I, J] = sum_k Zc[k, I] Zc[k, J]``.
    """
    t = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2)
    z_ptr = tl.where(b == 0, x_ptr, y_ptr)
    mu_ptr = stats_ptr + b * 3 * D + _MU * D
    ti = tl.load(tile_i_ptr + t)
    tj = tl.load(tile_j_ptr + t)
    offs_i = ti * BM + tl.arange(0, BM)
    offs_j = tj * BM + tl.arange(0, BM)
    k_lo = s * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        if GRAM:
            a_i = _load_centred(z_ptr, mu_ptr, offs_i, offs_k, N, D)  # (BM, BK)
            a_j = _load_centred(z_ptr, mu_ptr, offs_j, offs_k, N, D)
            a_i = _to_operand(a_i, OP_BF16, OP_TF32, INTERPRET)
            a_j = _to_operand(a_j, OP_BF16, OP_TF32, INTERPRET)
            acc = tl.dot(a_i, tl.trans(a_j), acc, input_precision=PRECISION)
        else:
            a_i = _load_centred(z_ptr, mu_ptr, offs_k, offs_i, N, D)  # (BK, BM)
            a_j = _load_centred(z_ptr, mu_ptr, offs_k, offs_j, N, D)
            a_i = _to_operand(a_i, OP_BF16, OP_TF32, INTERPRET)
            a_j = _to_operand(a_j, OP_BF16, OP_TF32, INTERPRET)
            acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision=PRECISION)
    if FUSED_EPILOGUE:  # a single split: finish here, no workspace round trip
        _small_matrix_epilogue(acc, mat_ptr + b * M * M, sumsq_ptr + b * n_tiles + t, ti, tj, M, GRAM, BM,
                               OP_BF16, OP_TF32, INTERPRET)
    else:
        r = tl.arange(0, BM)
        tile_ptr = ws_ptr + ((b * n_split + s) * n_tiles + t) * BM * BM
        tl.store(tile_ptr + r[:, None] * BM + r[None, :], acc)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, tile_i_ptr, tile_j_ptr, mat_ptr, sumsq_ptr, M, n_tiles, n_split,
                          GRAM: tl.constexpr, BM: tl.constexpr, OP_BF16: tl.constexpr,
                          OP_TF32: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    b = tl.program_id(1)
    r = tl.arange(0, BM)
    acc = tl.zeros((BM, BM), dtype=tl.float32)
    for s in range(0, n_split):  # fixed order: deterministic
        tile_ptr = ws_ptr + ((b * n_split + s) * n_tiles + t) * BM * BM
        acc += tl.load(tile_ptr + r[:, None] * BM + r[None, :])
    ti = tl.load(tile_i_ptr + t)
    tj = tl.load(tile_j_ptr + t)
    _small_matrix_epilogue(acc, mat_ptr + b * M * M, sumsq_ptr + b * n_tiles + t, ti, tj, M, GRAM, BM,
                           OP_BF16, OP_TF32, INTERPRET)


# ----------------------------------------------------------------------------------------------
# 3. Scalar loss
# ----------------------------------------------------------------------------------------------
@triton.jit
def _finalize_kernel(loss_ptr, inv_part_ptr, hinge_part_ptr, n2sq_part_ptr, sumsq_ptr, n_dblocks, n_tiles,
                     inv_scale, var_scale, cov_scale, GRAM: tl.constexpr, BLOCK: tl.constexpr):
    inv = _sum_all(inv_part_ptr, n_dblocks, BLOCK)
    hinge = _sum_all(hinge_part_ptr, 2 * n_dblocks, BLOCK)
    off = _sum_all(sumsq_ptr, 2 * n_tiles, BLOCK)
    if GRAM:  # ||G||^2 includes the diagonal of M: take it out (safe for N < D, docs/vicreg-kernel.md s. 2)
        off -= _sum_all(n2sq_part_ptr, 2 * n_dblocks, BLOCK)
    tl.store(loss_ptr, inv_scale * inv + var_scale * hinge + cov_scale * off)


# ----------------------------------------------------------------------------------------------
# 4. Gradient: one GEMM per branch with a fused epilogue
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grad_kernel(x_ptr, y_ptr, stats_ptr, mat_ptr, grad_loss_ptr, dx_ptr, dy_ptr,
                 N, D, M, first_branch, inv_nm1, eps, gamma, d_inv, d_var, d_cov,
                 GRAM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 OP_BF16: tl.constexpr, OP_TF32: tl.constexpr, INTERPRET: tl.constexpr,
                 PRECISION: tl.constexpr):
    """``dZ[I, J]`` for branch b: ``T = G Zc`` (k over N) or ``T = Zc M_off`` (k over D), then

    ``dZ = g * (sign d_inv (x - y) - d_var a/sigma Zc + d_cov (T - [GRAM] Zc n2r))``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = first_branch + tl.program_id(2)
    z_ptr = tl.where(b == 0, x_ptr, y_ptr)
    dz_ptr = tl.where(b == 0, dx_ptr, dy_ptr)
    stats = stats_ptr + b * 3 * D
    mat = mat_ptr + b * M * M
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if GRAM:
        for k0 in range(0, N, BK):
            ks = k0 + tl.arange(0, BK)
            g_mask = (rows < N)[:, None] & (ks < N)[None, :]
            g_tile = tl.load(mat + rows[:, None] * M + ks[None, :], mask=g_mask, other=0.0)
            zc_tile = _load_centred(z_ptr, stats + _MU * D, ks, cols, N, D)
            acc = tl.dot(_as_operand(g_tile, INTERPRET), _to_operand(zc_tile, OP_BF16, OP_TF32, INTERPRET),
                         acc, input_precision=PRECISION)
    else:
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            zc_tile = _load_centred(z_ptr, stats + _MU * D, rows, ks, N, D)
            m_mask = (ks < D)[:, None] & (cols < D)[None, :]
            m_tile = tl.load(mat + ks[:, None] * M + cols[None, :], mask=m_mask, other=0.0)
            acc = tl.dot(_to_operand(zc_tile, OP_BF16, OP_TF32, INTERPRET), _as_operand(m_tile, INTERPRET),
                         acc, input_precision=PRECISION)

    # Epilogue: invariance + variance terms, diagonal correction, upstream gradient, store.
    cmask = cols < D
    mask = (rows < N)[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    yv = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(stats + _MU * D + cols, mask=cmask, other=0.0)
    zc = tl.where(mask, tl.where(b == 0, xv, yv) - mu[None, :], 0.0)
    n2 = tl.load(stats + _N2 * D + cols, mask=cmask, other=0.0)
    sigma = tl.sqrt(n2 * inv_nm1 + eps)
    var_coef = tl.where(gamma - sigma > 0.0, d_var / sigma, 0.0)  # strict: relu'(0) = 0
    cov_term = acc
    if GRAM:  # T - Zc diag(n2), in the rounded operands that T was computed from
        n2r = tl.load(stats + _N2R * D + cols, mask=cmask, other=0.0)
        cov_term = acc - _to_operand(zc, OP_BF16, OP_TF32, INTERPRET).to(tl.float32) * n2r[None, :]
    sign = tl.where(b == 0, 1.0, -1.0)
    g = tl.load(grad_loss_ptr).to(tl.float32)
    dz = g * (sign * d_inv * (xv - yv) - var_coef[None, :] * zc + d_cov * cov_term)
    if OP_BF16:  # bf16 inputs get bf16 gradients
        dz = _to_bf16(dz, INTERPRET)
    tl.store(dz_ptr + offs, dz, mask=mask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
INTERPRET: bool = type(_grad_kernel).__name__ == "InterpretedFunction"

_poison = False


@contextlib.contextmanager
def poisoned_outputs():
    """Allocate every kernel output filled with NaN, so an element a kernel forgot to write shows up."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


def _device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for the launches inside (a no-op off CUDA).

    Triton launches on the current device and stream, not on the device of the tensors it is given, so
    without this guard a tensor on ``cuda:1`` would be read by a kernel running on ``cuda:0``.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()  # CPU tensors under the interpreter


def _alloc(shape, dtype, device) -> torch.Tensor:
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch options (fixed, no autotune: see the module docstring)."""

    syrk_bm: int  # tile edge of the m x m matrix
    syrk_bk: int  # reduction step of the split-K product
    grad_bm: int
    grad_bn: int
    grad_bk: int
    num_warps: int
    num_stages: int = 3
    stats_block_n: int = 64
    stats_block_d: int = 64
    reduce_block: int = 256


# Untuned starting points (no GPU was available when they were chosen; see BENCHMARKS.md).
SMALL_TILES = LaunchConfig(syrk_bm=64, syrk_bk=64, grad_bm=64, grad_bn=64, grad_bk=32, num_warps=4)
LARGE_TILES = LaunchConfig(syrk_bm=128, syrk_bk=32, grad_bm=128, grad_bn=128, grad_bk=32, num_warps=8)


def pick_config(n: int, d: int) -> LaunchConfig:
    """Large tiles once the m x m matrix has enough of them to fill the GPU."""
    return LARGE_TILES if min(n, d) >= 1024 else SMALL_TILES


@functools.lru_cache(maxsize=16)  # called every forward; depends only on the grid and the device
def _upper_tiles(n_blocks: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates (i, j), i <= j, of the upper-triangular tiles of an n_blocks x n_blocks grid."""
    ii, jj = torch.triu_indices(n_blocks, n_blocks)
    return ii.to(device=device, dtype=torch.int32), jj.to(device=device, dtype=torch.int32)


def _heuristic_split_k(n_tiles: int, k_blocks: int, device: torch.device) -> int:
    """Enough K-splits for about two programs per SM, each split at least a few k-steps long."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        min_blocks_per_split = 4
    else:  # interpreter: a few splits, so that the reduce kernel runs in CPU tests too
        target, min_blocks_per_split = 4, 1
    return max(1, min(triton.cdiv(target, n_tiles), k_blocks // min_blocks_per_split))


def _check_inputs(x: torch.Tensor) -> None:
    if not x.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton VICReg path needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                           "embcache.kernels.vicreg_triton is first imported (CPU interpreter)")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"the Triton VICReg path takes float32 or bfloat16, got {x.dtype}")
    n, d = x.shape
    if n * d >= 2**31 or 2 * min(n, d) ** 2 >= 2**31:
        raise ValueError("int32 offsets: N*D and 2*min(N,D)^2 must stay below 2^31")


class TritonBackend:
    """``forward``/``backward`` with the same contract as the closed-form PyTorch path.

    Args:
        fp32_precision: ``tl.dot`` input precision for fp32 operands ("ieee", "tf32", "tf32x3").
        split_k: number of K-splits of the m x m product; None picks one (tests force 1 and > 1).
        config: launch config; None picks one from the shape.
    """

    def __init__(self, fp32_precision: str = "ieee", split_k: int | None = None,
                 config: LaunchConfig | None = None):
        self.fp32_precision = fp32_precision
        self.split_k = split_k
        self.config = config

    def _dot_args(self, dtype: torch.dtype) -> dict:
        op_bf16 = dtype == torch.bfloat16
        # fp32 inputs at "tf32": every dot operand is rounded to TF32 in the kernel first, so the squared
        # norms subtracted on the Gram route come from the same values the tensor cores multiply.
        op_tf32 = not op_bf16 and self.fp32_precision == "tf32"
        # bf16 operands keep tl.dot's default precision ("tf32"; only fp32 operands look at it).
        return dict(OP_BF16=op_bf16, OP_TF32=op_tf32, INTERPRET=INTERPRET,
                    PRECISION="tf32" if op_bf16 else self.fp32_precision)

    def forward(self, x: torch.Tensor, y: torch.Tensor, k: VICRegCoefficients):
        _check_inputs(x)
        with _device_guard(x.device):  # every launch below runs on x's device
            return self._forward(x, y, k)

    def backward(self, grad_loss: torch.Tensor, x: torch.Tensor, y: torch.Tensor, saved,
                 k: VICRegCoefficients, need_x: bool = True, need_y: bool = True):
        if not (need_x or need_y):
            return None, None
        with _device_guard(x.device):
            return self._backward(grad_loss, x, y, saved, k, need_x, need_y)

    def _forward(self, x: torch.Tensor, y: torch.Tensor, k: VICRegCoefficients):
        x, y = x.contiguous(), y.contiguous()
        n, d = x.shape
        dev = x.device
        cfg = self.config or pick_config(n, d)
        dot = self._dot_args(x.dtype)
        gram = use_gram_route(n, d)
        m, k_len = (n, d) if gram else (d, n)  # the small side, and the side the product reduces over

        n_dblocks = triton.cdiv(d, cfg.stats_block_d)
        stats = _alloc((2, 3, d), torch.float32, dev)
        inv_part = _alloc((n_dblocks,), torch.float32, dev)
        hinge_part = _alloc((2, n_dblocks), torch.float32, dev)
        n2sq_part = _alloc((2, n_dblocks), torch.float32, dev)
        _column_stats_kernel[(n_dblocks,)](
            x, y, stats, inv_part, hinge_part, n2sq_part, n, d, n_dblocks, k.inv_nm1, k.eps, k.gamma,
            BLOCK_N=cfg.stats_block_n, BLOCK_D=cfg.stats_block_d, OP_BF16=dot["OP_BF16"],
            OP_TF32=dot["OP_TF32"], INTERPRET=INTERPRET, num_warps=4)

        bm, bk = cfg.syrk_bm, cfg.syrk_bk
        tile_i, tile_j = _upper_tiles(triton.cdiv(m, bm), dev)
        n_tiles = tile_i.numel()
        k_blocks = triton.cdiv(k_len, bk)
        n_split = min(self.split_k or _heuristic_split_k(n_tiles, k_blocks, dev), k_blocks)
        k_per_split = triton.cdiv(k_blocks, n_split) * bk
        n_split = triton.cdiv(k_len, k_per_split)  # drop splits left empty by the rounding up
        mat = _alloc((2, m, m), torch.bfloat16 if dot["OP_BF16"] else torch.float32, dev)
        sumsq = _alloc((2, n_tiles), torch.float32, dev)
        fused = n_split == 1
        ws = mat if fused else _alloc((2, n_split, n_tiles, bm, bm), torch.float32, dev)
        _small_matrix_kernel[(n_tiles, n_split, 2)](
            x, y, stats, tile_i, tile_j, ws, mat, sumsq, n, d, m, k_len, k_per_split, n_tiles, n_split,
            GRAM=gram, BM=bm, BK=bk, FUSED_EPILOGUE=fused, **dot,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if not fused:
            _splitk_reduce_kernel[(n_tiles, 2)](
                ws, tile_i, tile_j, mat, sumsq, m, n_tiles, n_split, GRAM=gram, BM=bm,
                OP_BF16=dot["OP_BF16"], OP_TF32=dot["OP_TF32"], INTERPRET=INTERPRET, num_warps=cfg.num_warps)

        loss = _alloc((), torch.float32, dev)
        _finalize_kernel[(1,)](loss, inv_part, hinge_part, n2sq_part, sumsq, n_dblocks, n_tiles,
                               k.inv_scale, k.var_scale, k.cov_scale, GRAM=gram, BLOCK=cfg.reduce_block)
        return loss, (stats, mat)

    def _backward(self, grad_loss, x, y, saved, k: VICRegCoefficients, need_x: bool, need_y: bool):
        stats, mat = saved
        x, y = x.contiguous(), y.contiguous()
        n, d = x.shape
        cfg = self.config or pick_config(n, d)
        dx = _alloc((n, d), x.dtype, x.device) if need_x else None
        dy = _alloc((n, d), y.dtype, y.device) if need_y else None
        grad_loss = grad_loss.to(device=x.device, dtype=torch.float32).contiguous()
        # Branch axis: both branches, or only the one that needs a gradient (e.g. y detached).
        grid = (triton.cdiv(n, cfg.grad_bm), triton.cdiv(d, cfg.grad_bn), int(need_x) + int(need_y))
        _grad_kernel[grid](
            x, y, stats, mat, grad_loss, dx if need_x else dy, dy if need_y else dx,
            n, d, mat.shape[-1], 0 if need_x else 1, k.inv_nm1, k.eps, k.gamma, k.d_inv, k.d_var, k.d_cov,
            GRAM=use_gram_route(n, d), BM=cfg.grad_bm, BN=cfg.grad_bn, BK=cfg.grad_bk,
            **self._dot_args(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return dx, dy
