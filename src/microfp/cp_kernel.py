"""Fused per-voxel backward-Euler update of the crystal-plasticity solver (CPU, numba): the CPU path of
:meth:`microfp.cp.Material.update`.

Why a hand-written kernel: the local Newton of :mod:`microfp.cp` solves an 8x8 (7x7 without twins)
nonlinear system per voxel, and in torch each of its steps is a pass over (m, N_s) tensors (flow law,
resistances, the (m, 30) x (30, 36) Jacobian product, index copies of the voxels still iterating, a
batched 8x8 solve, a 6x6 inverse, the rotation of the tangent): about 80 % of the solver's CPU time
went into those passes. No library fuses a per-voxel Newton with line
search like this (torch.compile compiled for 45 s and was not faster), so this module does the same
arithmetic for one voxel at a time, in registers and a few small scratch arrays, in one compiled
loop over the voxels. Also here: the Fourier-space step of the Galerkin projection (:func:`green`) and the
per-voxel tangent product of CG (:func:`matvec`), one pass each instead of dozens of torch operations.

Same equations, same order of the steps and the same tests as the torch path (``Material._local``):
crystal-frame unknowns ``y = (sigma, Gamma[, Gamma_tw])``, resistances by three Newton steps of the
hardening law per slip family, power law with the exponents raised by multiplications and square roots
(as :func:`microfp.cp._power`), Newton with backtracking line search on ``|r|^2``, convergence on the
lab-frame residual, the tangent ``(S0 + sum_a dgd_a p_a p_a^T)^-1`` rotated to the lab frame. Only the
order of the additions inside the small matrix products and the pivoting of the 8x8 solve differ, so
the two paths agree to round-off (tests: curves within 1e-10). No ``fastmath`` (it would reorder sums),
and each voxel is computed by one thread from its own inputs only, so the results are the same bits
from run to run and for any number of threads. The small helpers are inlined by numba
(``inline="always"``); ``residual`` and ``jacobian``, called at two sites each, are left to LLVM:
inlining them too doubled a fresh clone's compile time (~75 s vs ~40 s) for no measurable speed.
The tangent is a second kernel (:func:`_tangent_kernel`), run only for the VEs that the solver still
iterates: an increment's last update brings its VE into equilibrium, and its tangent went unused. The
update leaves it what it needs (the crystal-frame solution and the factors of the last Newton step's
Jacobian), and it does what the update did until solver v5 with them, so the same bits.
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np
from numba import njit

__all__ = ["cg_direction", "cg_dot", "cg_step", "first_call_seconds", "green", "matvec", "update_voxels"]

_FIRST_CALL: dict[str, float] = {}
BLOCK = 256  # voxels per block of the parallel loop (one set of scratch arrays each)
# cached on disk next to this file (later processes load the machine code instead of compiling it);
# no fastmath: the additions stay in the order written
_OPTS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)


@njit(inline="always", **_OPTS)
def power(x, quarters, e):
    """``x ** e`` (x >= 0) as :func:`microfp.cp._power`: by multiplications and square roots when
    ``quarters`` = 4 e is a whole number in (0, 256), else ``x ** e``."""
    if quarters == 76:  # n - 1 = 19 of the flow law, unrolled (the same products as the loop below)
        x2 = x * x
        x4 = x2 * x2
        x8 = x4 * x4
        return (x * x2) * (x8 * x8)
    if quarters == 5:  # a - 1 = 1.25 of the hardening law
        return math.sqrt(math.sqrt(x)) * x
    if quarters <= 0:
        return x**e
    k = quarters // 4
    frac = quarters % 4
    have = False
    out = 1.0
    if frac:
        root = math.sqrt(x)
        if frac == 2:
            out = root
        elif frac == 1:
            out = math.sqrt(root)
        else:
            out = root * math.sqrt(root)
        have = True
    base = x
    while k:
        if k & 1:
            if have:
                out = out * base
            else:
                out = base
                have = True
        k >>= 1
        if k:
            base = base * base
    return out


@njit(**_OPTS)  # not inlined by numba (module docstring)
def residual(y, tgt, xin, tf, slip_n, nk, S0, P0, P0T, ns, first, family, xs_inf, rate, n_exp, q_n, a_sl, q_a,
             h0, h_tw_sl, h_tw_tw, r, dg, dgd, dgx, xi, u, xs, us, acc):
    """Local residual ``r`` (6 + nk) at ``y`` (crystal frame), and dg, dgd, dgx, xi, u (N_s) as
    ``Material._residual``; ``xs``, ``us`` (families,) scratch; ``xs_inf`` here holds the reciprocals
    ``1 / xi_inf`` of the slip families. Returns ``r . r``."""
    nsys = P0.shape[0]
    G = y[6]
    # the stress in locals: the stores to dg, dgd, ... below might alias y for the compiler
    y0, y1, y2, y3, y4, y5 = y[0], y[1], y[2], y[3], y[4], y[5]
    nf = first.shape[0]
    if nf == 4:
        # the four slip families of Mg as four independent chains in one loop, so the CPU overlaps their
        # square roots and divisions (the same operations per family, in the same order, as the loop below)
        xa, xb, xc, xd = xin[first[0]], xin[first[1]], xin[first[2]], xin[first[3]]
        na, nb, nc, nd = xa, xb, xc, xd
        ra, rb, rc, rdd = xs_inf[0], xs_inf[1], xs_inf[2], xs_inf[3]  # reciprocals (see _block)
        Ha = Hb = Hc = Hd = 0.0
        dHa = dHb = dHc = dHd = 0.0
        for it in range(3):
            sa = 1.0 - xa * ra
            sb = 1.0 - xb * rb
            sc = 1.0 - xc * rc
            sd = 1.0 - xd * rdd
            pa = power(abs(sa), q_a, a_sl - 1.0)
            pb = power(abs(sb), q_a, a_sl - 1.0)
            pc = power(abs(sc), q_a, a_sl - 1.0)
            pd = power(abs(sd), q_a, a_sl - 1.0)
            Ha = h0 * pa * sa
            Hb = h0 * pb * sb
            Hc = h0 * pc * sc
            Hd = h0 * pd * sd
            dHa = -h0 * a_sl * pa * ra
            dHb = -h0 * a_sl * pb * rb
            dHc = -h0 * a_sl * pc * rc
            dHd = -h0 * a_sl * pd * rdd
            if it == 2:
                break
            xa = xa - (xa - na - Ha * G) / (1.0 - dHa * G)
            xb = xb - (xb - nb - Hb * G) / (1.0 - dHb * G)
            xc = xc - (xc - nc - Hc * G) / (1.0 - dHc * G)
            xd = xd - (xd - nd - Hd * G) / (1.0 - dHd * G)
        xs[0], xs[1], xs[2], xs[3] = xa, xb, xc, xd
        us[0] = Ha / (1.0 - dHa * G)
        us[1] = Hb / (1.0 - dHb * G)
        us[2] = Hc / (1.0 - dHc * G)
        us[3] = Hd / (1.0 - dHd * G)
        nf = 0
    for f in range(nf):
        xsn = xin[first[f]]
        rinf = xs_inf[f]  # the reciprocal of xi_inf (see _block): one division per family and call, not six
        x = xsn
        H = 0.0
        dH = 0.0
        for it in range(3):
            sat = 1.0 - x * rinf
            powm1 = power(abs(sat), q_a, a_sl - 1.0)
            H = h0 * powm1 * sat
            dH = -h0 * a_sl * powm1 * rinf
            if it == 2:
                break
            x = x - (x - xsn - H * G) / (1.0 - dH * G)
        xs[f] = x
        us[f] = H / (1.0 - dH * G)
    for a in range(ns):
        xi[a] = xs[family[a]]
        u[a] = us[family[a]]
    if nk == 2:
        add = h_tw_sl * (slip_n + G) * G + h_tw_tw * y[7]
        ut = h_tw_sl * (slip_n + 2.0 * G)
        for a in range(ns, nsys):
            xi[a] = xin[a] + add
            u[a] = ut
    # 1 / xi into dgd first (the systems of a family share their resistance: one division per family)
    last = -1.0
    rxi = 0.0
    for a in range(nsys):
        if xi[a] != last:
            last = xi[a]
            rxi = 1.0 / last
        dgd[a] = rxi
    # the flow law without branches and with contiguous loads (P0T = P0^T), so the compiler can run
    # several systems at once in vector registers: each system's operations, and their order, as before
    rg = rate * n_exp
    if q_n == 76:
        for a in range(nsys):
            rxi = dgd[a]
            tau = (((((y0 * P0T[0, a]) + y1 * P0T[1, a]) + y2 * P0T[2, a]) + y3 * P0T[3, a]) + y4 * P0T[4, a]) + y5 * P0T[5, a]
            ratio = tau * rxi
            ratio = 1e3 if ratio > 1e3 else ratio
            ratio = -1e3 if ratio < -1e3 else ratio
            x = abs(ratio)
            x2 = x * x
            x4 = x2 * x2
            x8 = x4 * x4
            powm1 = (x * x2) * (x8 * x8)
            g = rate * powm1 * ratio
            gd = rg * powm1
            fac = 1.0 if a < ns else (tf if ratio > 0 else 0.0)
            g = g * fac if a >= ns else g
            gd = gd * fac if a >= ns else gd
            dg[a] = g
            dgd[a] = gd * rxi
            dgx[a] = -n_exp * g * rxi
    else:
        for a in range(nsys):
            rxi = dgd[a]
            tau = (((((y0 * P0T[0, a]) + y1 * P0T[1, a]) + y2 * P0T[2, a]) + y3 * P0T[3, a]) + y4 * P0T[4, a]) + y5 * P0T[5, a]
            ratio = tau * rxi
            ratio = 1e3 if ratio > 1e3 else ratio
            ratio = -1e3 if ratio < -1e3 else ratio
            powm1 = power(abs(ratio), q_n, n_exp - 1.0)
            g = rate * powm1 * ratio
            gd = rg * powm1
            if a >= ns:
                fac = tf if ratio > 0 else 0.0
                g *= fac
                gd *= fac
            dg[a] = g
            dgd[a] = gd * rxi
            dgx[a] = -n_exp * g * rxi
    # sums over the systems with the outputs innermost: six independent chains of additions (in the
    # order a = 0, 1, ...) that the CPU overlaps, instead of one chain of 30 dependent additions each
    # (accumulators in registers; the zero terms of twins at tau <= 0 are added, not branched around: an
    # unpredictable branch costs more than six additions, and adding zero changes no bit of a sum)
    e0 = e1 = e2 = e3 = e4 = e5 = 0.0
    for a in range(nsys):
        w = dg[a]
        e0 += w * P0[a, 0]
        e1 += w * P0[a, 1]
        e2 += w * P0[a, 2]
        e3 += w * P0[a, 3]
        e4 += w * P0[a, 4]
        e5 += w * P0[a, 5]
    acc[0], acc[1], acc[2], acc[3], acc[4], acc[5] = e0, e1, e2, e3, e4, e5
    for i in range(6):
        s = 0.0
        for j in range(6):
            s += y[j] * S0[j, i]
        r[i] = (s + acc[i]) - tgt[i]
    s = 0.0
    for a in range(ns):
        s += abs(dg[a])
    r[6] = y[6] - s
    if nk == 2:
        s = 0.0
        for a in range(ns, nsys):
            s += dg[a]
        r[7] = y[7] - s
    f = 0.0
    for i in range(6 + nk):
        f += r[i] * r[i]
    return f


@njit(inline="always", **_OPTS)
def stress_block(dgd, S0, PP, A, acc):
    """``A = S0 + sum_a dgd_a p_a p_a^T`` (6, 6), symmetric; ``PP`` (N_s, 21) holds the upper triangles of
    ``p_a p_a^T`` row by row. The 21 sums are locals (registers), in the order a = 0, 1, ...; terms with
    ``dgd_a = 0`` (twins at tau <= 0) are skipped, which changes no bit. ``acc`` unused (signature)."""
    nsys = PP.shape[0]
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = c12 = c13 = c14 = c15 = c16 = c17 = c18 = c19 = c20 = 0.0
    for a in range(nsys):
        w = dgd[a]
        if w != 0.0:
            c0 += w * PP[a, 0]
            c1 += w * PP[a, 1]
            c2 += w * PP[a, 2]
            c3 += w * PP[a, 3]
            c4 += w * PP[a, 4]
            c5 += w * PP[a, 5]
            c6 += w * PP[a, 6]
            c7 += w * PP[a, 7]
            c8 += w * PP[a, 8]
            c9 += w * PP[a, 9]
            c10 += w * PP[a, 10]
            c11 += w * PP[a, 11]
            c12 += w * PP[a, 12]
            c13 += w * PP[a, 13]
            c14 += w * PP[a, 14]
            c15 += w * PP[a, 15]
            c16 += w * PP[a, 16]
            c17 += w * PP[a, 17]
            c18 += w * PP[a, 18]
            c19 += w * PP[a, 19]
            c20 += w * PP[a, 20]
    A[0, 0] = S0[0, 0] + c0
    A[0, 1] = S0[0, 1] + c1
    A[1, 0] = A[0, 1]
    A[0, 2] = S0[0, 2] + c2
    A[2, 0] = A[0, 2]
    A[0, 3] = S0[0, 3] + c3
    A[3, 0] = A[0, 3]
    A[0, 4] = S0[0, 4] + c4
    A[4, 0] = A[0, 4]
    A[0, 5] = S0[0, 5] + c5
    A[5, 0] = A[0, 5]
    A[1, 1] = S0[1, 1] + c6
    A[1, 2] = S0[1, 2] + c7
    A[2, 1] = A[1, 2]
    A[1, 3] = S0[1, 3] + c8
    A[3, 1] = A[1, 3]
    A[1, 4] = S0[1, 4] + c9
    A[4, 1] = A[1, 4]
    A[1, 5] = S0[1, 5] + c10
    A[5, 1] = A[1, 5]
    A[2, 2] = S0[2, 2] + c11
    A[2, 3] = S0[2, 3] + c12
    A[3, 2] = A[2, 3]
    A[2, 4] = S0[2, 4] + c13
    A[4, 2] = A[2, 4]
    A[2, 5] = S0[2, 5] + c14
    A[5, 2] = A[2, 5]
    A[3, 3] = S0[3, 3] + c15
    A[3, 4] = S0[3, 4] + c16
    A[4, 3] = A[3, 4]
    A[3, 5] = S0[3, 5] + c17
    A[5, 3] = A[3, 5]
    A[4, 4] = S0[4, 4] + c18
    A[4, 5] = S0[4, 5] + c19
    A[5, 4] = A[4, 5]
    A[5, 5] = S0[5, 5] + c20


@njit(**_OPTS)  # not inlined by numba (module docstring)
def jacobian(u, dg, dgd, dgx, S0, P0, PP, ns, nk, h_tw_tw, J, acc):
    """(6 + nk, 6 + nk) derivative of the residual, as ``Material._jacobian``; ``acc`` (>= 24,) scratch.

    ``[[S0 + sum_a dgd_a p_a p_a^T, sum_a c_0a p_a, sum_tw c_1a p_a], [-sum_slip s_a dgd_a p_a^T, 1 -
    sum_slip s_a c_0a, 0], [-sum_tw dgd_a p_a^T, -sum_tw c_0a, 1 - sum_tw c_1a]]`` with ``c_0 = dgx u``,
    ``c_1 = dgx h_0^tw-tw`` and ``s = sign(dg)``.
    """
    nsys = P0.shape[0]
    stress_block(dgd, S0, PP, J, acc)
    # sums over the systems in local accumulators (registers), in the order a = 0, 1, ...
    p0 = p1 = p2 = p3 = p4 = p5 = q0 = q1 = q2 = q3 = q4 = q5 = 0.0
    s66 = 0.0
    for a in range(ns):
        c0 = dgx[a] * u[a]
        sg = math.copysign(1.0, dg[a]) if dg[a] != 0.0 else 0.0
        w = sg * dgd[a]
        s66 += sg * c0
        p0 += c0 * P0[a, 0]
        p1 += c0 * P0[a, 1]
        p2 += c0 * P0[a, 2]
        p3 += c0 * P0[a, 3]
        p4 += c0 * P0[a, 4]
        p5 += c0 * P0[a, 5]
        q0 += w * P0[a, 0]
        q1 += w * P0[a, 1]
        q2 += w * P0[a, 2]
        q3 += w * P0[a, 3]
        q4 += w * P0[a, 4]
        q5 += w * P0[a, 5]
    J[6, 6] = 1.0 - s66
    if nk == 2:
        t0 = t1 = t2 = t3 = t4 = t5 = d0 = d1 = d2 = d3 = d4 = d5 = 0.0
        s76 = 0.0
        s77 = 0.0
        for a in range(ns, nsys):
            w = dgd[a]
            if w == 0.0:  # a twin at tau <= 0: dg, dgd and dgx are all zero (skipping changes no bit)
                continue
            c0 = dgx[a] * u[a]
            c1 = dgx[a] * h_tw_tw
            s76 += c0
            s77 += c1
            p0 += c0 * P0[a, 0]
            p1 += c0 * P0[a, 1]
            p2 += c0 * P0[a, 2]
            p3 += c0 * P0[a, 3]
            p4 += c0 * P0[a, 4]
            p5 += c0 * P0[a, 5]
            t0 += c1 * P0[a, 0]
            t1 += c1 * P0[a, 1]
            t2 += c1 * P0[a, 2]
            t3 += c1 * P0[a, 3]
            t4 += c1 * P0[a, 4]
            t5 += c1 * P0[a, 5]
            d0 += w * P0[a, 0]
            d1 += w * P0[a, 1]
            d2 += w * P0[a, 2]
            d3 += w * P0[a, 3]
            d4 += w * P0[a, 4]
            d5 += w * P0[a, 5]
        J[6, 7] = 0.0
        J[7, 6] = -s76
        J[7, 7] = 1.0 - s77
        J[0, 7] = t0
        J[7, 0] = -d0
        J[1, 7] = t1
        J[7, 1] = -d1
        J[2, 7] = t2
        J[7, 2] = -d2
        J[3, 7] = t3
        J[7, 3] = -d3
        J[4, 7] = t4
        J[7, 4] = -d4
        J[5, 7] = t5
        J[7, 5] = -d5
    J[0, 6] = p0
    J[6, 0] = -q0
    J[1, 6] = p1
    J[6, 1] = -q1
    J[2, 6] = p2
    J[6, 2] = -q2
    J[3, 6] = p3
    J[6, 3] = -q3
    J[4, 6] = p4
    J[6, 4] = -q4
    J[5, 6] = p5
    J[6, 5] = -q5


@njit(inline="always", **_OPTS)
def lu_solve(A, b, n, rd, piv):
    """Overwrite ``b`` (n,) with ``A^-1 b`` by Gaussian elimination with partial pivoting, keeping the
    factors: ``A`` becomes the LU factors of the row-permuted matrix (multipliers below the diagonal),
    ``piv`` (>= n,) the row swapped with each row, ``rd`` the reciprocal pivots (one division per pivot),
    so :func:`lu_block` can solve further right-hand sides."""
    for c in range(n):
        p = c
        best = abs(A[c, c])
        for i in range(c + 1, n):
            if abs(A[i, c]) > best:
                best = abs(A[i, c])
                p = i
        piv[c] = p
        if p != c:
            for j in range(n):
                A[c, j], A[p, j] = A[p, j], A[c, j]
            b[c], b[p] = b[p], b[c]
        rd[c] = 1.0 / A[c, c]
        for i in range(c + 1, n):
            m = A[i, c] * rd[c]
            A[i, c] = m
            if m != 0.0:
                for j in range(c + 1, n):
                    A[i, j] -= m * A[c, j]
                b[i] -= m * b[c]
    for c in range(n - 1, -1, -1):
        s = b[c]
        for j in range(c + 1, n):
            s -= A[c, j] * b[j]
        b[c] = s * rd[c]


@njit(inline="always", **_OPTS)
def lu_block(A, n, rd, piv, K, Ms, e):
    """The first six columns of ``J^-1`` from the factors of :func:`lu_solve`: ``K`` (6, 6) its stress rows,
    ``Ms`` (n - 6, 6) its shear rows; ``e`` (>= n,) scratch."""
    for col in range(6):
        for i in range(n):
            e[i] = 1.0 if i == col else 0.0
        for c in range(n):
            p = piv[c]
            if p != c:
                e[c], e[p] = e[p], e[c]
        for i in range(1, n):
            s = e[i]
            for k in range(i):
                s -= A[i, k] * e[k]
            e[i] = s
        for c in range(n - 1, -1, -1):
            s = e[c]
            for j in range(c + 1, n):
                s -= A[c, j] * e[j]
            e[c] = s * rd[c]
        for i in range(6):
            K[i, col] = e[i]
        for i in range(6, n):
            Ms[i - 6, col] = e[i]


@njit(inline="always", **_OPTS)
def inverse6(A, K, W):
    """``K = A^-1`` (6, 6) by Gauss-Jordan elimination with partial pivoting; ``W`` (6, 12) scratch."""
    for i in range(6):
        for j in range(6):
            W[i, j] = A[i, j]
            W[i, 6 + j] = 1.0 if i == j else 0.0
    for c in range(6):
        piv = c
        best = abs(W[c, c])
        for i in range(c + 1, 6):
            if abs(W[i, c]) > best:
                best = abs(W[i, c])
                piv = i
        if piv != c:
            for j in range(12):
                W[c, j], W[piv, j] = W[piv, j], W[c, j]
        rd = 1.0 / W[c, c]
        for j in range(c, 12):
            W[c, j] *= rd
        for i in range(6):
            if i != c:
                m = W[i, c]
                if m != 0.0:
                    for j in range(c, 12):
                        W[i, j] -= m * W[c, j]
    for i in range(6):
        for j in range(6):
            K[i, j] = W[i, 6 + j]


@njit(inline="always", **_OPTS)
def consistent_block(J, ny, W, K, Ms):
    """``K`` (6, 6) = the stress-stress block of ``J^-1`` and ``Ms`` (ny - 6, 6) its shear-stress block (d shears /
    d eps, crystal frame) (``J`` (ny, ny), the local Jacobian; destroyed
    as scratch, with ``W`` (>= ny, >= ny + 6)): the tangent d sigma / d eps of the fully implicit update,
    hardening included (the Schur complement ``(A - B D^-1 C)^-1``), by Gauss-Jordan elimination with
    partial pivoting on ``[J | I_6; 0]``. Returns False if a pivot is zero or not finite."""
    m = ny + 6
    for i in range(ny):
        for j in range(ny):
            W[i, j] = J[i, j]
        for j in range(6):
            W[i, ny + j] = 1.0 if i == j else 0.0
    for c in range(ny):
        piv = c
        best = abs(W[c, c])
        for i in range(c + 1, ny):
            if abs(W[i, c]) > best:
                best = abs(W[i, c])
                piv = i
        if not (best > 0.0) or not math.isfinite(best):
            return False
        if piv != c:
            for j in range(m):
                W[c, j], W[piv, j] = W[piv, j], W[c, j]
        rd = 1.0 / W[c, c]
        for j in range(c, m):
            W[c, j] *= rd
        for i in range(ny):
            if i != c:
                f = W[i, c]
                if f != 0.0:
                    for j in range(c, m):
                        W[i, j] -= f * W[c, j]
    for i in range(6):
        for j in range(6):
            K[i, j] = W[i, ny + j]
    for i in range(6, ny):
        for j in range(6):
            Ms[i - 6, j] = W[i, ny + j]
    return True


@njit(inline="always", **_OPTS)
def symmetric_positive(K, L):
    """Symmetrise ``K`` (6, 6) in place; True if it is then positive definite (Cholesky into ``L`` scratch)."""
    for i in range(6):
        for j in range(i + 1, 6):
            s = 0.5 * (K[i, j] + K[j, i])
            K[i, j] = s
            K[j, i] = s
    for j in range(6):
        s = K[j, j]
        for k in range(j):
            s -= L[j, k] * L[j, k]
        if not (s > 0.0):
            return False
        d = math.sqrt(s)
        L[j, j] = d
        for i in range(j + 1, 6):
            t = K[i, j]
            for k in range(j):
                t -= L[i, k] * L[j, k]
            L[i, j] = t / d
    return True


@njit(parallel=True, **_OPTS)
def _kernel(gid, Q, target, xi_n, tf, slip_n, sig0, shears0, S0, P0, PP, ns, first, family, xs_inf, rate,
            n_exp, q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw, tol_abs, tol_rel, max_local,
            sig_out, xi_out, dg_out, shears_out, deps_out, conv_out, it_out, y_out, lu_out, rd_out, piv_out):
    """All voxels, in blocks of ``BLOCK``; each voxel reads only its own inputs, so the split over threads
    does not change any result."""
    M = gid.shape[0]
    nblocks = (M + BLOCK - 1) // BLOCK
    for blk in numba.prange(nblocks):
        _block(blk * BLOCK, min(M, (blk + 1) * BLOCK), gid, Q, target, xi_n, tf, slip_n, sig0, shears0, S0, P0,
               PP, ns, first, family, xs_inf, rate, n_exp, q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw, tol_abs, tol_rel,
               max_local, sig_out, xi_out, dg_out, shears_out, deps_out, conv_out, it_out, y_out, lu_out, rd_out,
               piv_out)


@njit(**_OPTS)
def _block(lo, hi, gid, Q, target, xi_n, tf, slip_n, sig0, shears0, S0, P0, PP, ns, first, family, xs_inf,
           rate, n_exp, q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw, tol_abs, tol_rel, max_local, sig_out, xi_out, dg_out,
           shears_out, deps_out, conv_out, it_out, y_out, lu_out, rd_out, piv_out):
    """The update of voxels ``lo:hi`` (see :func:`update_voxels`), with one set of scratch arrays; the tangent
    is :func:`_tangent_block`'s, from the crystal-frame solution ``y_out`` and the factors of the last Newton
    step's Jacobian (``lu_out``, ``rd_out``, ``piv_out``, as :func:`lu_solve` leaves them; where a step was taken)."""
    nsys = P0.shape[0]
    nk = shears0.shape[1]
    nf = first.shape[0]
    ny = 6 + nk
    P0T = np.ascontiguousarray(P0.T)  # (6, N_s): contiguous per component for the flow law
    rinf = np.empty(nf)  # 1 / xi_inf per slip family: the residual multiplies by it
    for f in range(nf):
        rinf[f] = 1.0 / xs_inf[f]
    y = np.empty(ny)
    tgt = np.empty(6)
    ynew = np.empty(ny)
    dy = np.empty(ny)
    r = np.empty(ny)
    dg = np.empty(nsys)
    dgd = np.empty(nsys)
    dgx = np.empty(nsys)
    xi = np.empty(nsys)
    u = np.empty(nsys)
    xs = np.empty(nf)
    us = np.empty(nf)
    J = np.empty((ny, ny))
    rdv = np.empty(ny)
    piv = np.empty(ny, dtype=np.int64)
    acc = np.empty(24)
    for m in range(lo, hi):
        g = gid[m]
        Qg = Q[g]
        amax = 0.0
        for i in range(6):
            s = 0.0
            t = 0.0
            for j in range(6):
                s += Qg[j, i] * sig0[m, j]
                t += Qg[j, i] * target[m, j]
            y[i] = s
            tgt[i] = t
            if abs(target[m, i]) > amax:
                amax = abs(target[m, i])
        for k in range(nk):
            y[6 + k] = shears0[m, k]
        tol = tol_abs + tol_rel * amax
        xin = xi_n[m]
        f = residual(y, tgt, xin, tf[m], slip_n[m], nk, S0, P0, P0T, ns, first, family, rinf, rate, n_exp, q_n,
                     a_sl, q_a, h0, h_tw_sl, h_tw_tw, r, dg, dgd, dgx, xi, u, xs, us, acc)
        converged = False
        iterations = 0
        for it in range(max_local + 1):
            iterations = it
            done = True
            for i in range(6):
                s = 0.0
                for j in range(6):
                    s += Qg[i, j] * r[j]
                if not abs(s) < tol:
                    done = False
            for k in range(nk):
                if not abs(r[6 + k]) < tol:
                    done = False
            if done:
                # the tangent is left to _tangent_block (it is needed only where equilibrium is not reached
                # yet): the factors of the last step's Jacobian go out for it to reuse
                if it > 0:
                    for i in range(ny):
                        rd_out[m, i] = rdv[i]
                        piv_out[m, i] = piv[i]
                        for j in range(ny):
                            lu_out[m, i, j] = J[i, j]
                converged = True
                break
            if it == max_local:
                break
            jacobian(u, dg, dgd, dgx, S0, P0, PP, ns, nk, h_tw_tw, J, acc)
            for i in range(ny):
                dy[i] = -r[i]
            lu_solve(J, dy, ny, rdv, piv)
            # backtracking line search on |r|^2 (the power law with n = 20 overshoots easily): the full
            # step, then up to 16 halvings, the last one taken unchecked, as Material._local (one call
            # site of the inlined residual here, not two: shorter compilation)
            f0 = f
            alpha = 1.0
            for ls in range(17):
                if ls > 0:
                    alpha *= 0.5
                for i in range(ny):
                    ynew[i] = y[i] + alpha * dy[i]
                f = residual(ynew, tgt, xin, tf[m], slip_n[m], nk, S0, P0, P0T, ns, first, family, rinf, rate,
                             n_exp, q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw, r, dg, dgd, dgx, xi, u, xs, us, acc)
                if math.isfinite(f) and f <= (1.0 - 1e-4 * alpha) * f0:
                    break
            for i in range(ny):
                y[i] = ynew[i]
        it_out[m] = iterations
        conv_out[m] = converged
        for i in range(ny):
            y_out[m, i] = y[i]
        for k in range(nk):
            shears_out[m, k] = y[6 + k]
        for i in range(6):
            s = 0.0
            for j in range(6):
                s += Qg[i, j] * y[j]
            sig_out[m, i] = s
        if converged:
            for a in range(nsys):
                xi_out[m, a] = xi[a]
                dg_out[m, a] = dg[a]
            # plastic strain increment, crystal frame (in ynew as scratch), then lab
            for i in range(6):
                s = 0.0
                for a in range(nsys):
                    s += dg[a] * P0[a, i]
                ynew[i] = s
            for i in range(6):
                s = 0.0
                for j in range(6):
                    s += Qg[i, j] * ynew[j]
                deps_out[m, i] = s
        else:
            for a in range(nsys):
                xi_out[m, a] = xin[a]
                dg_out[m, a] = 0.0
            for i in range(6):
                deps_out[m, i] = 0.0


@njit(parallel=True, **_OPTS)
def _tangent_kernel(members, V, gid, Q, C, target, xi_n, tf, slip_n, y_in, lu_in, rd_in, piv_in, it_in, conv_in, S0,
                    P0, PP, ns, first, family, xs_inf, rate, n_exp, q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw, consistent,
                    K_out, M_out):
    """The tangents of the voxels of the VEs ``members`` (b,) (``V`` voxels each, VE-major in the inputs), into
    ``K_out`` (b V, 6, 6) and ``M_out`` (b V, k, 6), in blocks of ``BLOCK``; each voxel reads only its own
    inputs, so the split over threads does not change any result."""
    total = members.shape[0] * V
    nblocks = (total + BLOCK - 1) // BLOCK
    for blk in numba.prange(nblocks):
        _tangent_block(blk * BLOCK, min(total, (blk + 1) * BLOCK), members, V, gid, Q, C, target, xi_n, tf, slip_n,
                       y_in, lu_in, rd_in, piv_in, it_in, conv_in, S0, P0, PP, ns, first, family, xs_inf, rate, n_exp,
                       q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw, consistent, K_out, M_out)


@njit(**_OPTS)
def _tangent_block(lo, hi, members, V, gid, Q, C, target, xi_n, tf, slip_n, y_in, lu_in, rd_in, piv_in, it_in,
                   conv_in, S0, P0, PP, ns, first, family, xs_inf, rate, n_exp, q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw,
                   consistent, K_out, M_out):
    """Outputs ``lo:hi`` of :func:`_tangent_kernel`: the lab-frame tangent and shear sensitivities of each voxel
    as :func:`_block` computed them up to solver v5, the same operations in the same order, so the same bits:
    ``"consistent"``: the first six columns of ``J^-1`` from the factors of the last Newton step (or, where
    no step was taken, of the Jacobian at the solution), the stress block symmetrised, where that is positive
    definite; else the tangent at fixed resistances at the solution, no shear sensitivities. Where a step's
    factors are not enough, the residual is evaluated again at the solution (the same inputs: the same bits)."""
    nsys = P0.shape[0]
    nk = M_out.shape[1]
    nf = first.shape[0]
    ny = 6 + nk
    P0T = np.ascontiguousarray(P0.T)
    rinf = np.empty(nf)
    for f in range(nf):
        rinf[f] = 1.0 / xs_inf[f]
    tgt = np.empty(6)
    r = np.empty(ny)
    dg = np.empty(nsys)
    dgd = np.empty(nsys)
    dgx = np.empty(nsys)
    xi = np.empty(nsys)
    u = np.empty(nsys)
    xs = np.empty(nf)
    us = np.empty(nf)
    J = np.empty((ny, ny))
    K = np.empty((6, 6))
    W = np.empty((6, 12))
    WJ = np.empty((ny, ny + 6))
    L = np.empty((6, 6))
    Ms = np.empty((nk, 6))
    rdv = np.empty(ny)
    piv = np.empty(ny, dtype=np.int64)
    ev = np.empty(ny)
    acc = np.empty(24)
    for j_out in range(lo, hi):
        m = members[j_out // V] * V + j_out % V
        g = gid[m]
        Qg = Q[g]
        if not conv_in[m]:  # the elastic stiffness, no shear prediction
            for k in range(nk):
                for j in range(6):
                    M_out[j_out, k, j] = 0.0
            for i in range(6):
                for j in range(6):
                    K_out[j_out, i, j] = 0.5 * (C[g, i, j] + C[g, j, i])
            continue
        good = False
        if consistent and it_in[m] > 0:  # the factors of the last step's Jacobian
            for i in range(ny):
                rdv[i] = rd_in[m, i]
                piv[i] = piv_in[m, i]
                for j in range(ny):
                    J[i, j] = lu_in[m, i, j]
            lu_block(J, ny, rdv, piv, K, Ms, ev)
            good = symmetric_positive(K, L)
        if not good:
            # dg, dgd, dgx, u at the solution, as the update's last residual evaluation left them
            for i in range(6):
                t = 0.0
                for j in range(6):
                    t += Qg[j, i] * target[m, j]
                tgt[i] = t
            residual(y_in[m], tgt, xi_n[m], tf[m], slip_n[m], nk, S0, P0, P0T, ns, first, family, rinf, rate, n_exp,
                     q_n, a_sl, q_a, h0, h_tw_sl, h_tw_tw, r, dg, dgd, dgx, xi, u, xs, us, acc)
            if consistent and it_in[m] == 0:
                jacobian(u, dg, dgd, dgx, S0, P0, PP, ns, nk, h_tw_tw, J, acc)
                good = consistent_block(J, ny, WJ, K, Ms) and symmetric_positive(K, L)
        if not good:  # the tangent at fixed resistances (always SPD), no shear prediction
            for k in range(nk):
                for j in range(6):
                    Ms[k, j] = 0.0
            stress_block(dgd, S0, PP, J, acc)
            for i in range(6):
                for j in range(6):
                    K[i, j] = J[i, j]
            inverse6(K, K, W)
        # lab tangent Q K Q^T (W[:, :6] = K Q^T as scratch), symmetrised
        for i in range(6):
            for j in range(6):
                s = 0.0
                for k in range(6):
                    s += K[i, k] * Qg[j, k]
                W[i, j] = s
        for i in range(6):
            for j in range(6):
                s = 0.0
                for k in range(6):
                    s += Qg[i, k] * W[k, j]
                K_out[j_out, i, j] = s
        for i in range(6):
            for j in range(i + 1, 6):
                s = 0.5 * (K_out[j_out, i, j] + K_out[j_out, j, i])
                K_out[j_out, i, j] = s
                K_out[j_out, j, i] = s
        # d shears / d eps in the lab frame: Ms Q^T
        for k in range(nk):
            for j in range(6):
                s = 0.0
                for i in range(6):
                    s += Ms[k, i] * Qg[j, i]
                M_out[j_out, k, j] = s


@njit(parallel=True, **_OPTS)
def _green(th, n1, n2, n3, mask, out):
    """The Fourier-space step of ``cp.Projection``: ``th`` and ``out`` (B, n, n, m, 12) are complex (B, n, n, m, 6)
    Mandel fields viewed as real and imaginary parts; ``n1, n2, n3`` the unit wave vector and ``mask`` (n, n, m).
    ``out = (2 sym(T n) - n n^T (n.T n)) masked`` (Mandel), per mode, the real operator on both parts."""
    B, nx, ny, nz = th.shape[0], th.shape[1], th.shape[2], th.shape[3]
    h = 1.0 / math.sqrt(2.0)
    for bx in numba.prange(B * nx):
        b = bx // nx
        x = bx % nx
        for yy in range(ny):
            for z in range(nz):
                a1 = n1[x, yy, z]
                a2 = n2[x, yy, z]
                a3 = n3[x, yy, z]
                mk = mask[x, yy, z]
                for p in range(2):
                    v0 = th[b, x, yy, z, p]
                    v1 = th[b, x, yy, z, 2 + p]
                    v2 = th[b, x, yy, z, 4 + p]
                    v3 = h * th[b, x, yy, z, 6 + p]
                    v4 = h * th[b, x, yy, z, 8 + p]
                    v5 = h * th[b, x, yy, z, 10 + p]
                    t0 = v0 * a1 + v5 * a2 + v4 * a3
                    t1 = v5 * a1 + v1 * a2 + v3 * a3
                    t2 = v4 * a1 + v3 * a2 + v2 * a3
                    ntn = t0 * a1 + t1 * a2 + t2 * a3
                    u0 = (2.0 * t0 - a1 * ntn) * mk
                    u1 = (2.0 * t1 - a2 * ntn) * mk
                    u2 = (2.0 * t2 - a3 * ntn) * mk
                    out[b, x, yy, z, p] = a1 * u0
                    out[b, x, yy, z, 2 + p] = a2 * u1
                    out[b, x, yy, z, 4 + p] = a3 * u2
                    out[b, x, yy, z, 6 + p] = h * (a2 * u2 + a3 * u1)
                    out[b, x, yy, z, 8 + p] = h * (a1 * u2 + a3 * u0)
                    out[b, x, yy, z, 10 + p] = h * (a1 * u1 + a2 * u0)


@njit(parallel=True, **_OPTS)
def _matvec(K, x, out):
    """``out[m] = K[m] @ x[m]``: (M, 6, 6) by (M, 6)."""
    M = K.shape[0]
    nblocks = (M + BLOCK - 1) // BLOCK
    for blk in numba.prange(nblocks):
        for m in range(blk * BLOCK, min(M, (blk + 1) * BLOCK)):
            for i in range(6):
                s = 0.0
                for j in range(6):
                    s += K[m, i, j] * x[m, j]
                out[m, i] = s


@njit(parallel=True, **_OPTS)
def cg_dot(a, b, out):
    """``out[i] = a[i] . b[i]`` for (B, L) arrays: one sum per VE, in index order (the same bits for any
    number of threads)."""
    for i in numba.prange(a.shape[0]):
        s = 0.0
        for j in range(a.shape[1]):
            s += a[i, j] * b[i, j]
        out[i] = s


@njit(parallel=True, **_OPTS)
def cg_step(x, r, p, Ap, alpha, rr):
    """One pass of conjugate gradients over (B, L) arrays: ``x += alpha p``, ``r -= alpha Ap`` (in place) and
    ``rr[i] = r[i] . r[i]`` (index order), per VE ``i``."""
    for i in numba.prange(x.shape[0]):
        a = alpha[i]
        s = 0.0
        for j in range(x.shape[1]):
            x[i, j] = x[i, j] + a * p[i, j]
            t = r[i, j] - a * Ap[i, j]
            r[i, j] = t
            s += t * t
        rr[i] = s


@njit(parallel=True, **_OPTS)
def cg_direction(p, r, beta):
    """``p = r + beta p`` in place, per VE, for (B, L) arrays."""
    for i in numba.prange(p.shape[0]):
        b = beta[i]
        for j in range(p.shape[1]):
            p[i, j] = r[i, j] + b * p[i, j]


def green(th: np.ndarray, n1: np.ndarray, n2: np.ndarray, n3: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fourier-space step of the Galerkin projection (``cp.Projection``) on ``th`` (B, n, n, m, 6) complex128 or
    complex64 (the wave vectors float64; the arithmetic in float64 either way): one pass instead of ~40 torch
    operations. Returns a new (B, n, n, m, 6) array of ``th``'s dtype."""
    out = np.empty_like(th)
    _green(th.view(th.real.dtype), n1, n2, n3, mask, out.view(th.real.dtype))
    return out


def matvec(K: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``K @ x`` per voxel: (M, 6, 6) and (M, 6), Pa and strain, float64 (or both float32: then the sums run in
    float64 and the result is rounded to float32); returns (M, 6) of ``x``'s dtype."""
    out = np.empty((K.shape[0], 6), dtype=x.dtype)
    _matvec(K, x, out)
    return out


def _quarters(e: float) -> int:
    """4 e when that is a whole number in (0, 256) (then powers are multiplications and roots), else 0."""
    q = 4.0 * float(e)
    return int(q) if q.is_integer() and 0 < q < 256 else 0


def _outer_upper(P0: np.ndarray) -> np.ndarray:
    """(N_s, 21) upper triangles of ``p_a p_a^T`` (row by row) of the Schmid tensors ``P0`` (N_s, 6)."""
    i, j = np.triu_indices(6)
    return np.ascontiguousarray(P0[:, i] * P0[:, j])


def first_call_seconds() -> float:
    """Wall seconds of this process's first kernel call (its compilation or cache load included); 0 before."""
    return float(_FIRST_CALL.get("s", 0.0))


def update_voxels(gid: np.ndarray, Q: np.ndarray, C: np.ndarray, target: np.ndarray, xi_n: np.ndarray,
                  tf: np.ndarray, slip_n: np.ndarray, sig0: np.ndarray, shears0: np.ndarray, *, S0: np.ndarray,
                  P0: np.ndarray, n_slip: int, first: np.ndarray, family: np.ndarray, xs_inf: np.ndarray,
                  rate: float, n: float, a_sl: float, h_0_sl_sl: float, h_0_tw_sl: float, h_0_tw_tw: float,
                  tol_abs: float, tol_rel: float, max_local: int, consistent: bool = False,
                  tangent: bool = True) -> dict:
    """Backward-Euler update of M voxels, float64, lab frame in and out (see ``Material._local``).

    Inputs: ``gid`` (M,) grain of each voxel; ``Q`` (G, 6, 6) Mandel rotations crystal -> lab; ``C`` (G, 6, 6)
    lab stiffness, Pa (the tangent of voxels that do not converge); ``target`` (M, 6) ``eps - eps_p^n``;
    ``xi_n`` (M, N_s) resistances, Pa; ``tf`` (M,) untwinned fraction; ``slip_n`` (M,) accumulated slip;
    ``sig0`` (M, 6) Pa and ``shears0`` (M, k) first guesses. Constants: crystal-frame compliance ``S0`` (6, 6)
    1/Pa and Schmid tensors ``P0`` (N_s, 6), the first ``n_slip`` slip systems; per slip family its first
    system ``first`` (F,) and ``xs_inf`` (F,) Pa, and the family of each slip system ``family`` (n_slip,);
    ``rate`` = dt dot_gamma_0; flow exponent ``n``; hardening ``a_sl``, ``h_0_*`` Pa.

    Returns ``sig`` (M, 6) Pa, ``xi`` (M, N_s), ``dg`` (M, N_s), ``shears`` (M, k), ``deps_p`` (M, 6),
    ``converged`` (M,) bool, ``iterations`` (M,) local Newton iterations, and ``tangent``: a function
    ``(members, V) -> (K, M)`` that computes the lab tangents ``K`` (b V, 6, 6) Pa (symmetrised; ``C`` where not
    converged) and shear sensitivities ``M`` (b V, k, 6) of the voxels of VEs ``members`` (b,) (``V`` voxels
    each, VE-major), as the update left them: a solver needs them only for VEs that are not in equilibrium
    yet. ``tangent=True``: also ``K`` and ``M`` (M, ...) of every voxel, computed at once.
    """
    M, nsys, nk = gid.shape[0], P0.shape[0], shears0.shape[1]
    ny = 6 + nk
    out = {
        "sig": np.empty((M, 6)), "xi": np.empty((M, nsys)), "dg": np.empty((M, nsys)),
        "shears": np.empty((M, nk)), "deps_p": np.empty((M, 6)), "converged": np.empty(M, dtype=np.bool_),
        "iterations": np.empty(M, dtype=np.int64),
    }
    # what the tangent needs: the crystal-frame solution and the factors of the last step's Jacobian
    keep = {"y": np.empty((M, ny)), "lu": np.empty((M, ny, ny)), "rd": np.empty((M, ny)),
            "piv": np.empty((M, ny), dtype=np.int64)}
    f64 = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
    i64 = lambda a: np.ascontiguousarray(a, dtype=np.int64)  # noqa: E731
    gid, Q, C, target, xi_n, tf, slip_n = i64(gid), f64(Q), f64(C), f64(target), f64(xi_n), f64(tf), f64(slip_n)
    S0, P0, first, family, xs_inf = f64(S0), f64(P0), i64(first), i64(family), f64(xs_inf)
    PP = _outer_upper(P0)
    consts = (int(n_slip), first, family, xs_inf, float(rate), float(n), _quarters(n - 1.0), float(a_sl),
              _quarters(a_sl - 1.0), float(h_0_sl_sl), float(h_0_tw_sl), float(h_0_tw_tw))
    first_call = "s" not in _FIRST_CALL
    start = time.perf_counter()
    _kernel(gid, Q, target, xi_n, tf, slip_n, f64(sig0), f64(shears0), S0, P0, PP, *consts, float(tol_abs),
            float(tol_rel), int(max_local), out["sig"], out["xi"], out["dg"], out["shears"], out["deps_p"],
            out["converged"], out["iterations"], keep["y"], keep["lu"], keep["rd"], keep["piv"])

    def tangents(members: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray]:
        members = i64(members)
        K, Ms = np.empty((members.shape[0] * V, 6, 6)), np.empty((members.shape[0] * V, nk, 6))
        _tangent_kernel(members, int(V), gid, Q, C, target, xi_n, tf, slip_n, keep["y"], keep["lu"], keep["rd"],
                        keep["piv"], out["iterations"], out["converged"], S0, P0, PP, *consts, bool(consistent), K, Ms)
        return K, Ms

    out["tangent"] = tangents
    if tangent:
        out["K"], out["M"] = tangents(np.zeros(1, dtype=np.int64), M)
    if first_call:
        _FIRST_CALL["s"] = time.perf_counter() - start
    return out
