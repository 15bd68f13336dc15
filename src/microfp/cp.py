"""Crystal plasticity of HCP magnesium on a periodic voxel grid, in torch, batched over VEs.

Physics (small strain; at 1 % strain the rotations and stretches neglected are of order 1e-2):

* Elasticity: hexagonal Hooke's law, C11 59.5, C12 25.6, C13 21.5, C33 61.7, C44 16.5 GPa
  (C66 = (C11 - C12) / 2), c along the crystal z axis, rotated into the lab frame per grain with
  ``damask.Rotation`` (lab tensor = ``(~rotation) @ crystal tensor``, as ``damask.Orientation.Schmid``).
* Plasticity: DAMASK's ``phenopowerlaw`` with the Mg values of the reference file
  (``MG``): basal <a> (3), prismatic <a> (3), pyramidal <a> (6), 2nd-order pyramidal <c+a> (6)
  slip systems, Schmid tensors from ``damask.Orientation.Schmid(N_slip=[3, 3, 6, 0, 6])``;
  ``dot_gamma = dot_gamma_0 |tau / xi|^n sign(tau)``; hardening
  ``dot_xi = h_0 |1 - xi / xi_inf|^a sign(1 - xi / xi_inf) sum_j |dot_gamma_j|`` (all interaction
  coefficients 1). Twinning (optional, on by default) as DAMASK models it: unidirectional
  pseudo-slip on the tension {10-12} (6, xi_0 40 MPa) and compression {10-11} (6, xi_0 60 MPa)
  twin systems, ``dot_gamma_tw = (1 - f_tw) dot_gamma_0 (tau / xi_tw)^n`` for tau > 0 with
  ``f_tw = sum gamma_tw / gamma_char``, twin hardening ``h_0^tw-sl sum |dot_gamma_sl| +
  h_0^tw-tw sum dot_gamma_tw``. DAMASK's slip hardening by twins (coefficients of 1 Pa) and the
  twin push-up of xi_inf (10 sqrt(f_tw) Pa) are negligible and left out.
* Time integration per increment: backward Euler. The stress of each voxel solves
  ``S sigma + sum_a dgamma_a(sigma) p_a = eps - eps_p^n`` by Newton with a backtracking line search
  (``p_a`` = symmetric Schmid tensor); the slip resistance of step n+1 is iterated as a fixed point
  together with the global Newton iterations (it converges with them). The material tangent is the
  consistent one at fixed resistance, ``(S + sum_a d dgamma_a / d tau_a  p_a p_a^T)^-1`` (symmetric
  positive definite), i.e. the hardening contribution is neglected in the tangent.
* Equilibrium: Galerkin FFT (de Geus et al. 2017; Zeman et al. 2017): the unknown is the strain
  field, constrained to compatible fluctuations plus a mean; Newton iterations, each solving the
  linearised problem ``G(K : d eps) = -G(sigma)`` by conjugate gradients. ``G`` is the L2-orthogonal
  projection onto compatible fields, extended at the zero frequency by the projection onto the
  stress-controlled components of the mean, which imposes the mixed boundary conditions (prescribed
  mean eps_xx, zero mean stress otherwise; Lucarini & Segurado 2019): ``G`` stays an orthogonal
  projector, so the linear operator is symmetric positive definite and CG applies. Nyquist modes of
  even grids are projected out. Convergence: ``|G(sigma)|_rms / |mean sigma| < tolerance`` and the
  slip resistances at their fixed point. A failed increment is retried in halves (cut-backs); a VE
  that fails at the deepest cut-back is dropped from the batch and reported with the reason.

Tensors are held in Mandel notation (11, 22, 33, sqrt2 23, sqrt2 13, sqrt2 12), an orthonormal basis
of symmetric tensors, so dot products of 6-vectors are double contractions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "MG",
    "Load",
    "Material",
    "MgParameters",
    "SolverSettings",
    "VEResult",
    "grain_tensors",
    "hexagonal_stiffness",
    "mandel_from_tensor4",
    "solve",
]

SQ2 = math.sqrt(2.0)
_DEBUG = False
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


# --------------------------------------------------------------------------------------------------
# material parameters


@dataclass(frozen=True)
class MgParameters:
    """HCP Mg, DAMASK's phenopowerlaw example (reference/mg-phenopowerlaw.md). Units: Pa, 1/s."""

    c_over_a: float = 1.62350
    C11: float = 59.5e9
    C12: float = 25.6e9
    C13: float = 21.5e9
    C33: float = 61.7e9
    C44: float = 16.5e9
    # slip families: (name, N, xi_0, xi_inf); damask hP family order basal, prism, pyr<a>, pyr<c+a>1, pyr<c+a>2
    slip: tuple = (
        ("basal <a>", 3, 10e6, 40e6),
        ("prismatic <a>", 3, 55e6, 135e6),
        ("pyramidal <a>", 6, 60e6, 150e6),
        ("pyramidal <c+a>", 6, 60e6, 150e6),
    )
    N_slip_damask: tuple = (3, 3, 6, 0, 6)
    # twin families: (name, N, xi_0); damask hP family order {10-12}, {11-21}, {10-11}, {11-22}
    twin: tuple = (("tension {10-12}", 6, 40e6), ("compression {10-11}", 6, 60e6))
    N_twin_damask: tuple = (6, 0, 6, 0)
    dot_gamma_0: float = 1e-3
    n: float = 20.0
    h_0_sl_sl: float = 0.5e9
    a_sl: float = 2.25
    h_0_tw_tw: float = 50e6
    h_0_tw_sl: float = 0.15e9
    f_sat_sl_tw: float = 10.0


MG = MgParameters()


def hexagonal_stiffness(p: MgParameters = MG) -> np.ndarray:
    """(6, 6) Voigt stiffness of the hexagonal crystal (c along z), Pa."""
    C = np.zeros((6, 6))
    C[0, 0] = C[1, 1] = p.C11
    C[2, 2] = p.C33
    C[0, 1] = C[1, 0] = p.C12
    C[0, 2] = C[2, 0] = C[1, 2] = C[2, 1] = p.C13
    C[3, 3] = C[4, 4] = p.C44
    C[5, 5] = 0.5 * (p.C11 - p.C12)
    return C


def tensor4_from_voigt(Cv: np.ndarray) -> np.ndarray:
    """(3, 3, 3, 3) stiffness from a (6, 6) Voigt stiffness (engineering shear strains)."""
    C = np.zeros((3, 3, 3, 3))
    for I, (i, j) in enumerate(VOIGT_PAIRS):
        for J, (k, l) in enumerate(VOIGT_PAIRS):
            for a, b in {(i, j), (j, i)}:
                for c, d in {(k, l), (l, k)}:
                    C[a, b, c, d] = Cv[I, J]
    return C


def mandel_from_tensor4(C: np.ndarray) -> np.ndarray:
    """(..., 6, 6) Mandel matrix of minor-symmetric (..., 3, 3, 3, 3) tensors."""
    w = np.array([1.0, 1.0, 1.0, SQ2, SQ2, SQ2])
    out = np.empty(C.shape[:-4] + (6, 6))
    for I, (i, j) in enumerate(VOIGT_PAIRS):
        for J, (k, l) in enumerate(VOIGT_PAIRS):
            out[..., I, J] = w[I] * w[J] * C[..., i, j, k, l]
    return out


def mandel_from_tensor2(T: np.ndarray) -> np.ndarray:
    """(..., 6) Mandel vector of the symmetric part of (..., 3, 3) tensors."""
    S = 0.5 * (T + np.swapaxes(T, -1, -2))
    return np.stack(
        [S[..., 0, 0], S[..., 1, 1], S[..., 2, 2], SQ2 * S[..., 1, 2], SQ2 * S[..., 0, 2], SQ2 * S[..., 0, 1]], -1
    )


def grain_tensors(euler: np.ndarray, twinning: bool = True, p: MgParameters = MG) -> dict[str, np.ndarray]:
    """Lab-frame stiffness, compliance and Schmid tensors of grains with Bunge angles ``euler`` (G, 3), rad.

    Returns ``C``, ``S`` (G, 6, 6) Mandel, Pa and 1/Pa, and ``P`` (G, N_s, 6): symmetric Schmid tensors
    of the slip systems followed (if ``twinning``) by the twin systems, in Mandel notation.
    """
    import damask

    euler = np.asarray(euler, dtype=np.float64).reshape(-1, 3)
    rot = damask.Rotation.from_Euler_angles(euler)
    C_crystal = tensor4_from_voigt(hexagonal_stiffness(p))
    C_lab = (~rot) @ np.broadcast_to(C_crystal, (len(euler), 3, 3, 3, 3))
    C = mandel_from_tensor4(np.asarray(C_lab))
    C = 0.5 * (C + np.swapaxes(C, -1, -2))
    S = np.linalg.inv(C)
    ori = damask.Orientation(rotation=rot, lattice="hP", c=p.c_over_a)
    P = [np.asarray(ori.Schmid(N_slip=list(p.N_slip_damask)))]  # (N, G, 3, 3)
    if twinning:
        P.append(np.asarray(ori.Schmid(N_twin=list(p.N_twin_damask))))
    P = np.moveaxis(np.concatenate(P, axis=0), 0, 1)  # (G, N, 3, 3)
    return {"C": C, "S": 0.5 * (S + np.swapaxes(S, -1, -2)), "P": mandel_from_tensor2(P)}


def system_table(twinning: bool = True, p: MgParameters = MG) -> dict[str, np.ndarray]:
    """Per-system constants: ``xi_0``, ``xi_inf`` (Pa), ``twin`` (bool), ``gamma_char`` (twins), ``family``."""
    import damask

    xi0, xi_inf, twin, gchar, family = [], [], [], [], []
    for k, (_, n, x0, xinf) in enumerate(p.slip):
        xi0 += [x0] * n
        xi_inf += [xinf] * n
        twin += [False] * n
        gchar += [1.0] * n
        family += [k] * n
    if twinning:
        # (damask 3.1 fails on families with 0 systems here, so ask for all and select)
        every = np.abs(np.asarray(damask.Crystal(lattice="hP", a=1.0, c=p.c_over_a).characteristic_shear_twin(
            N_twin=[6, 6, 6, 6]
        ))).reshape(4, 6)
        shear = np.concatenate([every[f, :k] for f, k in enumerate(p.N_twin_damask) if k])
        i = 0
        for k, (_, n, x0) in enumerate(p.twin):
            xi0 += [x0] * n
            xi_inf += [np.inf] * n
            twin += [True] * n
            gchar += list(shear[i : i + n])
            family += [len(p.slip) + k] * n
            i += n
    return {
        "xi_0": np.array(xi0),
        "xi_inf": np.array(xi_inf),
        "twin": np.array(twin),
        "gamma_char": np.array(gchar),
        "family": np.array(family),
    }


# --------------------------------------------------------------------------------------------------
# the constitutive update


def _power(x: torch.Tensor, e: float) -> torch.Tensor:
    """``x ** e`` for x >= 0; by repeated squaring when ``e`` is a small whole number (n = 20)."""
    if float(e).is_integer() and 0 < e < 64:
        k, out, base = int(e), None, x
        while k:
            if k & 1:
                out = base if out is None else out * base
            k >>= 1
            if k:
                base = base * base
        return out
    return x.pow(e)


@dataclass
class State:
    """Plastic state of every voxel of a batch: leading dims (B, V)."""

    eps_p: torch.Tensor  # (B, V, 6) plastic strain
    xi: torch.Tensor  # (B, V, N_s) resistances
    gamma_tw: torch.Tensor  # (B, V, N_tw) accumulated twin shear

    def select(self, keep: torch.Tensor) -> "State":
        return State(self.eps_p[keep], self.xi[keep], self.gamma_tw[keep])

    def clone(self) -> "State":
        return State(self.eps_p.clone(), self.xi.clone(), self.gamma_tw.clone())


class Material:
    """Per-grain tensors of a batch of VEs and the backward-Euler stress update of the voxels."""

    def __init__(
        self,
        eulers: list[np.ndarray],
        twinning: bool = True,
        elastic: bool = False,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        p: MgParameters = MG,
        local_tol: float | None = None,
        max_local: int = 60,
        jacobian_systems: int = 0,
        state_tol: float = 1e-6,
        max_state: int = 20,
    ) -> None:
        self.p, self.elastic, self.twinning = p, elastic, twinning and not elastic
        self.dtype, self.device = dtype, torch.device(device)
        self.offsets = np.cumsum([0] + [len(e) for e in eulers])
        tens = grain_tensors(np.concatenate(eulers), twinning=self.twinning, p=p)
        kw = dict(dtype=dtype, device=self.device)
        self.C = torch.as_tensor(tens["C"], **kw)
        self.S = torch.as_tensor(tens["S"], **kw)
        self.P = torch.as_tensor(tens["P"], **kw)  # (G, N_s, 6)
        table = system_table(self.twinning, p)
        self.xi_0 = torch.as_tensor(table["xi_0"], **kw)
        self.xi_inf = torch.as_tensor(np.where(np.isinf(table["xi_inf"]), 1.0, table["xi_inf"]), **kw)
        self.twin = torch.as_tensor(table["twin"], device=self.device)
        self.slip = ~self.twin
        self.gamma_char = torch.as_tensor(table["gamma_char"][table["twin"]], **kw)
        self.n_systems = int(self.P.shape[1])
        self.n_twin = int(self.twin.sum())
        self.local_tol = local_tol if local_tol is not None else (1e-10 if dtype == torch.float64 else 2e-8)
        self.max_local = max_local
        self.jacobian_systems = jacobian_systems
        self.state_tol, self.max_state = state_tol, max_state

    # -- setup -----------------------------------------------------------------------------------
    def voxel_grains(self, grain_ids: np.ndarray) -> torch.Tensor:
        """(B, V) global grain index of every voxel of ``grain_ids`` (B, n, n, n)."""
        g = grain_ids.reshape(grain_ids.shape[0], -1).astype(np.int64) + self.offsets[:-1, None]
        return torch.as_tensor(g, device=self.device)

    def initial_state(self, gid: torch.Tensor) -> State:
        B, V = gid.shape
        kw = dict(dtype=self.dtype, device=self.device)
        return State(
            eps_p=torch.zeros(B, V, 6, **kw),
            xi=self.xi_0.expand(B, V, self.n_systems).clone(),
            gamma_tw=torch.zeros(B, V, self.n_twin, **kw),
        )

    # -- kinetics --------------------------------------------------------------------------------
    def _kinetics(self, tau: torch.Tensor, xi: torch.Tensor, twin_factor: torch.Tensor, dt: float):
        """Shear increments and d(increment)/d(tau) (m, N_s) for resolved stresses ``tau``."""
        p = self.p
        ratio = (tau / xi).clamp(-1e3, 1e3)
        mag = ratio.abs()
        powm1 = _power(mag, p.n - 1.0)
        rate = dt * p.dot_gamma_0
        dg = rate * powm1 * ratio
        dgd = rate * p.n * powm1 / xi
        if self.n_twin:
            # twins: unidirectional (tau > 0 only), only in the untwinned volume
            factor = ((~self.twin) | (ratio > 0)).to(tau.dtype) * torch.where(self.twin, twin_factor, 1.0)
            dg = dg * factor
            dgd = dgd * factor
        return dg, dgd

    def _residual(self, sig, Pg, Sg, target, xi, twin_factor, dt):
        tau = torch.bmm(Pg, sig.unsqueeze(-1)).squeeze(-1)
        dg, dgd = self._kinetics(tau, xi, twin_factor, dt)
        r = torch.bmm(Sg, sig.unsqueeze(-1)).squeeze(-1) + torch.bmm(dg.unsqueeze(1), Pg).squeeze(1) - target
        return r, dg, dgd

    def _jacobian(self, Sg, Pg, dgd):
        """S + sum_a dgd_a p_a p_a^T (over the ``jacobian_systems`` most active systems if fewer than all)."""
        k = self.jacobian_systems
        if 0 < k < self.n_systems:
            dgd, idx = torch.topk(dgd, k, dim=1)
            Pg = torch.gather(Pg, 1, idx[..., None].expand(-1, -1, 6))
        return Sg + torch.bmm(Pg.transpose(1, 2) * dgd.unsqueeze(1), Pg)

    # -- the update ------------------------------------------------------------------------------
    def _stress(self, g, target, xi, tf, sig, dt):
        """Newton (with line search) for the stress of voxels ``g`` (m,) at fixed resistances ``xi``.

        Returns ``(sig, dgamma, K, converged, iterations)``; ``K`` is the tangent at fixed ``xi``.
        """
        m = g.shape[0]
        sig = sig.clone()
        dg_out = torch.zeros(m, self.n_systems, dtype=self.dtype, device=self.device)
        K = torch.empty(m, 6, 6, dtype=self.dtype, device=self.device)
        converged = torch.zeros(m, dtype=torch.bool, device=self.device)
        active = torch.arange(m, device=self.device)
        Pg, Sg, tgt, xia, tfa = self.P[g], self.S[g], target, xi, tf
        s = sig
        iterations = 0
        r, dg, dgd = self._residual(s, Pg, Sg, tgt, xia, tfa, dt)
        for it in range(self.max_local + 1):
            iterations = it
            done = r.abs().amax(-1) < self.local_tol
            A = self._jacobian(Sg, Pg, dgd)
            if done.any():
                idx = active[done]
                sig[idx] = s[done]
                dg_out[idx] = dg[done]
                K[idx] = torch.linalg.inv(A[done])
                converged[idx] = True
            if done.all() or it == self.max_local:
                break
            keep = ~done
            active, s, r, A = active[keep], s[keep], r[keep], A[keep]
            Pg, Sg, tgt, xia, tfa = Pg[keep], Sg[keep], tgt[keep], xia[keep], tfa[keep]
            ds = -torch.linalg.solve(A, r.unsqueeze(-1)).squeeze(-1)
            # backtracking line search on |r|^2 (the power law with n = 20 overshoots easily)
            f0 = (r * r).sum(-1)
            new = s + ds
            r, dg, dgd = self._residual(new, Pg, Sg, tgt, xia, tfa, dt)
            alpha = torch.ones_like(f0)
            pending = torch.arange(new.shape[0], device=self.device)
            f_new = (r * r).sum(-1)
            for _ in range(16):
                accept = torch.isfinite(f_new) & (f_new <= (1.0 - 1e-4 * alpha[pending]) * f0[pending])
                pending = pending[~accept]
                if pending.numel() == 0:
                    break
                alpha[pending] *= 0.5
                new[pending] = s[pending] + alpha[pending, None] * ds[pending]
                rp, dgp, dgdp = self._residual(new[pending], Pg[pending], Sg[pending], tgt[pending], xia[pending], tfa[pending], dt)
                r[pending], dg[pending], dgd[pending] = rp, dgp, dgdp
                f_new = (rp * rp).sum(-1)
            s = new
        if not bool(converged.all()):
            bad = ~converged
            sig[active] = s
            K[bad] = self.C[g[bad]]
        return sig, dg_out, K, converged, iterations

    def _harden(self, xi_n, xi, dg):
        """Backward-Euler resistances: ``xi_n + dt * rate(xi, dgamma)`` (m, N_s)."""
        xi_new = xi_n.clone()
        slip_abs = dg[:, self.slip].abs().sum(-1, keepdim=True)
        sat = 1.0 - xi[:, self.slip] / self.xi_inf[self.slip]
        xi_new[:, self.slip] = xi_n[:, self.slip] + self.p.h_0_sl_sl * sat.abs().pow(self.p.a_sl) * torch.sign(sat) * slip_abs
        if self.n_twin:
            tw_sum = dg[:, self.twin].sum(-1, keepdim=True)
            xi_new[:, self.twin] = xi_n[:, self.twin] + self.p.h_0_tw_sl * slip_abs + self.p.h_0_tw_tw * tw_sum
        return xi_new

    def update(
        self,
        gid: torch.Tensor,
        eps: torch.Tensor,
        state_n: State,
        xi_guess: torch.Tensor,
        sig_guess: torch.Tensor,
        dt: float,
    ):
        """Backward-Euler update of every voxel for total strain ``eps`` (B, V, 6).

        The stress is found by Newton at fixed resistances; the resistances of step n+1 by a fixed
        point around it (``xi = xi_n + h(xi) sum |dgamma(sigma(xi))|``, starting from ``xi_guess``),
        so the result is a function of ``eps`` (to ``state_tol``). Returns ``(sig, K, state, ok,
        iterations)``: stress (B, V, 6), tangent (B, V, 6, 6) at fixed resistances, the new state,
        (B,) bool whether every voxel of each VE converged, and the most local Newton iterations.
        """
        B, V = gid.shape
        g = gid.reshape(-1)
        if self.elastic:
            Cg = self.C[g]
            sig = torch.einsum("mde,me->md", Cg, (eps - state_n.eps_p).reshape(-1, 6))
            ok = torch.ones(B, dtype=torch.bool, device=self.device)
            return sig.reshape(B, V, 6), Cg.reshape(B, V, 6, 6), state_n, ok, 1
        M = B * V
        target = (eps - state_n.eps_p).reshape(M, 6)
        xi_n = state_n.xi.reshape(M, -1)
        xi = xi_guess.reshape(M, -1).clone()
        if self.n_twin:
            frac = (state_n.gamma_tw / self.gamma_char).sum(-1).reshape(M, 1)
            tf = (1.0 - frac).clamp(min=0.0)
        else:
            tf = torch.ones(M, 1, dtype=self.dtype, device=self.device)
        sig = sig_guess.reshape(M, 6).clone()
        dg = torch.zeros(M, self.n_systems, dtype=self.dtype, device=self.device)
        K = torch.empty(M, 6, 6, dtype=self.dtype, device=self.device)
        ok_v = torch.ones(M, dtype=torch.bool, device=self.device)
        todo = torch.arange(M, device=self.device)
        most = 0
        for _ in range(self.max_state):
            s, d, k, conv, its = self._stress(g[todo], target[todo], xi[todo], tf[todo], sig[todo], dt)
            most = max(most, its)
            sig[todo], dg[todo], K[todo] = s, d, k
            ok_v[todo] = conv
            xi_new = self._harden(xi_n[todo], xi[todo], d)
            change = ((xi_new - xi[todo]).abs() / self.xi_0).amax(-1)
            xi[todo] = xi_new
            todo = todo[(change > self.state_tol) & conv]
            if todo.numel() == 0:
                break
        else:
            ok_v[todo] = False
        ok = ok_v.reshape(B, V).all(dim=1)
        eps_p = state_n.eps_p.reshape(M, 6) + torch.einsum("ma,mad->md", dg, self.P[g])
        gamma_tw = state_n.gamma_tw
        if self.n_twin:
            gamma_tw = gamma_tw + dg[:, self.twin].reshape(B, V, -1)
        new_state = State(eps_p.reshape(B, V, 6), xi.reshape(B, V, -1), gamma_tw)
        K = 0.5 * (K + K.transpose(-1, -2))
        return sig.reshape(B, V, 6), K.reshape(B, V, 6, 6), new_state, ok, most


# --------------------------------------------------------------------------------------------------
# the Galerkin projection with mixed boundary conditions


class Projection:
    """L2-orthogonal projection onto compatible strain fluctuations + stress-controlled mean components.

    Fields are (B, n, n, n, 6) Mandel. ``mixed`` (6,) bool marks the mean components that are free
    (stress-controlled); the others (strain-controlled) have a prescribed mean and no mean correction.
    """

    def __init__(self, n: int, mixed: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        self.n = n
        k = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype, device=device)
        kz = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype, device=device)
        kx, ky, kz = torch.meshgrid(k, k, kz, indexing="ij")
        norm = torch.sqrt(kx**2 + ky**2 + kz**2)
        norm[0, 0, 0] = 1.0
        self.nv = [kx / norm, ky / norm, kz / norm]
        mask = torch.ones_like(norm)
        mask[0, 0, 0] = 0.0
        if n % 2 == 0:
            half = n // 2
            mask[(kx.abs() == half) | (ky.abs() == half) | (kz.abs() == half)] = 0.0
        self.mask = mask
        self.mixed = mixed.to(device)

    def __call__(self, tau: torch.Tensor) -> torch.Tensor:
        n = self.n
        th = torch.fft.rfftn(tau, dim=(1, 2, 3))
        v = [th[..., i] for i in range(6)]
        n1, n2, n3 = self.nv
        h = 1.0 / SQ2
        T = [[v[0], h * v[5], h * v[4]], [h * v[5], v[1], h * v[3]], [h * v[4], h * v[3], v[2]]]
        Tn = [T[i][0] * n1 + T[i][1] * n2 + T[i][2] * n3 for i in range(3)]
        nTn = Tn[0] * n1 + Tn[1] * n2 + Tn[2] * n3
        nn = (n1, n2, n3)
        u = [(2.0 * Tn[i] - nn[i] * nTn) * self.mask for i in range(3)]
        out = torch.stack(
            [
                n1 * u[0],
                n2 * u[1],
                n3 * u[2],
                h * (n2 * u[2] + n3 * u[1]),
                h * (n1 * u[2] + n3 * u[0]),
                h * (n1 * u[1] + n2 * u[0]),
            ],
            dim=-1,
        )
        out[:, 0, 0, 0, :] = th[:, 0, 0, 0, :] * self.mixed
        return torch.fft.irfftn(out, s=(n, n, n), dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------------
# the solver


@dataclass(frozen=True)
class Load:
    """Uniaxial tension along x: mean eps_xx = rate * t, zero mean stress otherwise."""

    strain: float = 0.01
    rate: float = 1e-3
    increments: int = 20

    @property
    def times(self) -> np.ndarray:
        return np.linspace(0.0, self.strain / self.rate, self.increments + 1)

    @property
    def strains(self) -> np.ndarray:
        return np.linspace(0.0, self.strain, self.increments + 1)


@dataclass(frozen=True)
class SolverSettings:
    tolerance: float = 1e-5  # |G(sigma)|_rms / |mean sigma|
    state_tolerance: float = 1e-6  # fixed point of the resistances: max |change| / xi_0
    max_newton: int = 30
    max_cg: int = 400
    cg_forcing: float = 1e-2  # inexact Newton: CG stops at forcing * initial residual ...
    max_cutbacks: int = 4
    twinning: bool = True
    elastic: bool = False
    dtype: str = "float64"
    device: str = "cpu"
    jacobian_systems: int = 0  # 0: all systems in the local Jacobian and the tangent


@dataclass
class VEResult:
    """The curve of one VE: mean sigma_xx (Pa) at each of the load's points, and how it went."""

    strain: np.ndarray
    stress_xx: np.ndarray
    converged: bool
    reason: str = ""
    newton_iterations: int = 0
    cg_iterations: int = 0
    cutbacks: int = 0
    max_residual: float = 0.0
    wall_s: float = 0.0
    mean_stress: np.ndarray = field(default_factory=lambda: np.zeros(6))  # final, Mandel, Pa
    residuals: list = field(default_factory=list)  # final residual per increment
    last_residual: float = 0.0


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(1, 2, 3, 4))


def _bview(x: torch.Tensor, b: int) -> torch.Tensor:
    return x.reshape(b, *([1] * (x.dim() - 1))) if x.dim() else x


def cg(apply_A, rhs: torch.Tensor, tol_abs: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int]:
    """Batched conjugate gradients for SPD ``apply_A`` on (B, n, n, n, 6) fields; per-VE stopping."""
    B = rhs.shape[0]
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rr = _dot(r, r)
    active = rr.sqrt() > tol_abs
    it = 0
    while bool(active.any()) and it < max_iter:
        Ap = apply_A(p)
        pAp = _dot(p, Ap)
        alpha = torch.where(active & (pAp > 0), rr / torch.where(pAp > 0, pAp, 1.0), 0.0)
        x = x + alpha.view(B, 1, 1, 1, 1) * p
        r = r - alpha.view(B, 1, 1, 1, 1) * Ap
        rr_new = _dot(r, r)
        beta = torch.where(active, rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
        p = r + beta.view(B, 1, 1, 1, 1) * p
        rr = torch.where(active, rr_new, rr)
        active = active & (rr.sqrt() > tol_abs)
        it += 1
    return x, it


def solve(
    grain_ids: np.ndarray,
    eulers: list[np.ndarray],
    load: Load = Load(),
    settings: SolverSettings = SolverSettings(),
    log=None,
) -> list[VEResult]:
    """Simulate uniaxial tension of a batch of VEs (same grid size) in one batched solve.

    ``grain_ids`` (B, n, n, n) grain index per voxel, axes (x, y, z); ``eulers[b]`` (G_b, 3) Bunge
    radians. Returns one :class:`VEResult` per VE, in order; failures are results, not exceptions.
    """
    start = time.perf_counter()
    grain_ids = np.asarray(grain_ids)
    if grain_ids.ndim == 3:
        grain_ids = grain_ids[None]
    B, n = grain_ids.shape[0], grain_ids.shape[1]
    V = n**3
    dtype = getattr(torch, settings.dtype)
    device = torch.device(settings.device)
    mat = Material(
        eulers,
        twinning=settings.twinning,
        elastic=settings.elastic,
        dtype=dtype,
        device=device,
        jacobian_systems=settings.jacobian_systems,
        state_tol=settings.state_tolerance,
    )
    mixed = torch.tensor([0, 1, 1, 1, 1, 1], dtype=dtype)
    proj = Projection(n, mixed, dtype, device)
    gid = mat.voxel_grains(grain_ids)
    kw = dict(dtype=dtype, device=device)

    ids = list(range(B))  # original index of each batch member
    results = [
        VEResult(strain=load.strains, stress_xx=np.full(load.increments + 1, np.nan), converged=True) for _ in range(B)
    ]
    for r in results:
        r.stress_xx[0] = 0.0

    eps = torch.zeros(B, V, 6, **kw)
    sig = torch.zeros(B, V, 6, **kw)
    state = mat.initial_state(gid)
    # first guess of the strain increment: uniaxial stress in a transversely isotropic average
    nu = 0.3
    deps_last = torch.tensor([1.0, -nu, -nu, 0.0, 0.0, 0.0], **kw).expand(B, V, 6).clone() * load.rate
    dt_last = 1.0  # deps_last: the strain increment of the last step, of length dt_last

    def fail(members: torch.Tensor, reason: str) -> None:
        for b in members.nonzero().squeeze(-1).tolist():
            res = results[ids[b]]
            res.converged, res.reason = False, reason

    def step(t0: float, t1: float, depth: int):
        """Advance from t0 to t1, in halves where it fails (recursively); drops VEs that fail at the deepest."""
        nonlocal eps, sig, state, deps_last, dt_last
        dt = t1 - t0
        Bc = eps.shape[0]
        target_xx = load.rate * t1
        eps_try = eps + deps_last * (dt / dt_last)
        eps_try[..., 0] += target_xx - eps_try[..., 0].mean(dim=1, keepdim=True)
        xi_trial = state.xi.clone()
        s_try = sig.clone()
        conv = torch.zeros(Bc, dtype=torch.bool, device=device)
        bad = torch.zeros(Bc, dtype=torch.bool, device=device)
        why = ""
        last_err = torch.full((Bc,), float("inf"), **kw)
        for it in range(settings.max_newton):
            s_try, K, new_state, ok, _ = mat.update(gid, eps_try, state, xi_trial, s_try, dt)
            if not bool(ok.all()):
                bad |= ~ok
                why = "stress integration did not converge"
            if settings.elastic:
                dxi = torch.zeros(Bc, **kw)
            else:
                dxi = ((new_state.xi - xi_trial).abs() / mat.xi_0).amax(dim=(1, 2))
            xi_trial = new_state.xi
            f = s_try.reshape(Bc, n, n, n, 6)
            res = proj(f)
            mean = s_try.mean(dim=1)
            scale = mean.norm(dim=1).clamp(min=1.0)
            err = torch.sqrt(_dot(res, res) / V) / scale
            finite = torch.isfinite(err) & torch.isfinite(s_try).all(dim=(1, 2))
            if not bool(finite.all()):
                bad |= ~finite
                why = "non-finite stress"
            conv = (err < settings.tolerance) & ~bad
            last_err = err
            if _DEBUG:
                print(f"  t={t1:.3f} it={it} err={err.tolist()} dxi={dxi.tolist()}", flush=True)
            for b_i in range(Bc):
                results[ids[b_i]].newton_iterations += 1
            if bool((conv | bad).all()):
                break
            Kf = K.reshape(Bc, n, n, n, 6, 6)

            def apply_A(x: torch.Tensor) -> torch.Tensor:
                return proj(torch.einsum("bxyzij,bxyzj->bxyzi", Kf, x))

            rn = torch.sqrt(_dot(res, res))
            tol_abs = torch.maximum(settings.cg_forcing * rn, 0.2 * settings.tolerance * scale * math.sqrt(V))
            tol_abs = torch.where(conv | bad, torch.full_like(rn, float("inf")), tol_abs)
            d, cg_it = cg(apply_A, -res, tol_abs, settings.max_cg)
            for b_i in range(Bc):
                results[ids[b_i]].cg_iterations += cg_it
            eps_try = eps_try + d.reshape(Bc, V, 6)
        else:
            why = why or f"no equilibrium after {settings.max_newton} Newton iterations"
        failed = ~conv
        if bool(failed.any()) and depth < settings.max_cutbacks:
            for b_i in failed.nonzero().squeeze(-1).tolist():
                results[ids[b_i]].cutbacks += 1
            tm = 0.5 * (t0 + t1)
            step(t0, tm, depth + 1)
            if ids:
                step(tm, t1, depth + 1)
            return
        if bool(failed.any()):
            fail(failed, f"{why or 'no equilibrium'} (t = {t1:g} s, after {settings.max_cutbacks} cut-backs)")
            keep = ~failed
            _drop(keep)
            if not ids:
                return
            s_try, new_state, eps_try, last_err = s_try[keep], new_state.select(keep), eps_try[keep], last_err[keep]
        deps_last, dt_last = eps_try - eps, dt
        eps, sig, state = eps_try, s_try, new_state
        for b_i in range(eps.shape[0]):
            res_ = results[ids[b_i]]
            res_.last_residual = float(last_err[b_i])
            res_.max_residual = max(res_.max_residual, res_.last_residual)

    def _drop(keep: torch.Tensor) -> None:
        nonlocal eps, sig, state, deps_last, gid, ids
        eps, sig, state, deps_last, gid = eps[keep], sig[keep], state.select(keep), deps_last[keep], gid[keep]
        ids = [i for i, k in zip(ids, keep.tolist()) if k]

    times = load.times
    for inc in range(1, load.increments + 1):
        if not ids:
            break
        step(float(times[inc - 1]), float(times[inc]), 0)
        if not ids:
            break
        mean = sig.mean(dim=1).cpu().numpy()
        for b_i, orig in enumerate(ids):
            results[orig].stress_xx[inc] = mean[b_i, 0]
            results[orig].mean_stress = mean[b_i]
            results[orig].residuals.append(results[orig].last_residual)
        if log is not None:
            log(inc, [results[i] for i in ids])
    wall = time.perf_counter() - start
    for r in results:
        r.wall_s = wall / B
        if not r.converged:
            r.stress_xx[:] = np.nan
    return results
