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
  ``f_tw = sum gamma_tw / gamma_char``, twin hardening ``h_0^tw-sl gamma_sl sum |dot_gamma_sl| +
  h_0^tw-tw sum dot_gamma_tw`` with ``gamma_sl`` the slip accumulated so far (sum over systems of
  |gamma|): DAMASK v3.0.2's ``phenopowerlaw_dotState`` with its defaults c_3 = 1, c_4 = 0 (until
  solver v3 this factor was missing, so twins hardened ~100x too fast by slip). DAMASK's slip
  hardening by twins (coefficients of 1 Pa) and the twin push-up of xi_inf (10 sqrt(f_tw) Pa) are
  negligible and left out.
* Time integration per increment: backward Euler, fully implicit in the voxel. The unknowns of each
  voxel are its stress and the shears accumulated in the increment, ``Gamma = sum_slip |dgamma_a|``
  (and ``Gamma_tw = sum_twin dgamma_a``); the resistances are functions of them (``xi = xi_n +
  H(xi) Gamma`` solved per system, twins linear), so hardening and flow are solved together by one
  Newton iteration with a backtracking line search on
  ``S sigma + sum_a dgamma_a(sigma, xi(Gamma)) p_a = eps - eps_p^n`` and
  ``Gamma = sum_slip |dgamma_a|`` (``p_a`` = symmetric Schmid tensor). This is the same backward-Euler
  solution as iterating the resistances to a fixed point around a stress solve, at a quarter of the
  cost (the fixed point contracts by only ~2 % per sweep). The material tangent passed to the
  equilibrium solver (``SolverSettings.tangent``) is by default the consistent one, the stress block of the
  inverse local Jacobian (hardening included), symmetrised, where that is positive definite, else (and with
  ``"fixed"``, solver v4) the one at fixed resistances, ``(S + sum_a d dgamma_a / d tau_a  p_a p_a^T)^-1``
  (symmetric positive definite, so CG applies); it comes from the factors of the last local Newton step.
  The same inverse gives d shears / d eps, and each local Newton starts from the linearised response to
  the last equilibrium step (``sigma + K d eps``, shears likewise); an increment's first update starts from
  the last increment's rates extrapolated to second order, and runs to a loose local tolerance
  (``LOOSE_LOCAL_TOL``; equilibrium is never accepted on it). These change the iterates, not the equations:
  the curves move by < 5e-6 relative (16^3 and 64^3, against solver v4).
  The local Newton runs in each voxel's crystal frame, where every voxel shares the Schmid tensors and
  the compliance (one phase), so the products with them are plain matrix products; the strain goes in
  and the stress and tangent come out through the grain's orthogonal Mandel rotation ``Q``
  (:func:`mandel_rotation`), and convergence is tested on the lab-frame residual as before (solver v4
  computed the same update in the lab frame with per-voxel Schmid tensors; same results to round-off).
* Equilibrium: Galerkin FFT (de Geus et al. 2017; Zeman et al. 2017): the unknown is the strain
  field, constrained to compatible fluctuations plus a mean; Newton iterations, each solving the
  linearised problem ``G(K : d eps) = -G(sigma)`` by conjugate gradients. ``G`` is the L2-orthogonal
  projection onto compatible fields, extended at the zero frequency by the projection onto the
  stress-controlled components of the mean, which imposes the mixed boundary conditions (prescribed
  mean eps_xx, zero mean stress otherwise; Lucarini & Segurado 2019): ``G`` stays an orthogonal
  projector, so the linear operator is symmetric positive definite and CG applies. Nyquist
  frequencies of even grids as DAMASK (``derivative: continuous``): the Nyquist components of a wave
  vector are zeroed and the mode kept with the others (until solver v3 every mode with a Nyquist
  component was projected out, which made 16^3 VEs ~0.7 % too stiff at the elastic-plastic knee). Convergence: ``|G(sigma)|_rms / |mean sigma| < tolerance``. A VE
  that converges leaves the iterations of its batch; a VE whose increment fails is retried alone in
  halves (cut-backs) while the others keep their result; a VE that fails at the deepest cut-back is
  dropped from the batch and reported with the reason.
* Reported stress: ``VEResult.stress_xx`` is the volume average of the Cauchy stress DAMASK's
  finite-strain model gives for the same state, to first order in the elastic strain
  (:func:`cauchy_xx`, ``SolverSettings.stress_measure="cauchy"``; ``"small"``: the small-strain stress,
  solver v3 and before). DAMASK drives slip with the lattice-frame 2nd Piola-Kirchhoff stress S, the
  small-strain stress's counterpart, and its Cauchy stress exceeds it by ~0.3-0.5 % once grains flow.
* Implementation: on a CPU in float64 the voxel update, the projection's Fourier-space step, the
  tangent product and CG's vector updates run as fused numba kernels (:mod:`microfp.cp_kernel`, ``SolverSettings.kernel``): the
  same steps as the torch code here, so the same curves to round-off; torch on GPUs and in float32. The
  fused kernel computes tangents only for the VEs still iterating (:class:`Tangents`): the update that
  brings a VE into equilibrium needs none.
* Precision: float64 by default; float32 (``SolverSettings.dtype``) halves the memory traffic, which
  bounds the voxel update, and gives the same curves to the equilibrium tolerance (tests). The CG solve
  of each Newton step runs in float32 (``SolverSettings.cg_dtype``) whatever ``dtype``: the step is needed
  to ~1e-2 (``cg_forcing``) only, and the residual and the local update, which set the solution, stay in
  ``dtype``; the same Newton and CG iterations as float64 CG, curves within 2e-8.

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
# voxels per call of the local update: on a CPU the temporaries of a few thousand voxels (~2 MB each)
# stay in the caches, and the update is faster than in calls of 32768; a GPU wants large calls
CPU_CHUNK = 8192
GPU_CHUNK = 2**18
_DEBUG = False
EXTRAPOLATE = 1.0  # weight of the rates' slopes in the first guess of an increment
# local Newton tolerance (strain) of each increment's first update, at the extrapolated guess: its error
# (~1e-3 relative) is far above the equilibrium tolerance, so its stress need not be exact to LOCAL_TOL
LOOSE_LOCAL_TOL = 1e-7
# local Newton tolerance (strain) of the other updates, float64: a stress error of ~50 Pa per voxel, ~1e-6 of the
# stresses of a plastic VE, below the equilibrium tolerance (1e-5); 1e-10 (solver v5) took 25 % more local steps
# for curves within 5e-8 of these (16^3)
LOCAL_TOL = 1e-9
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


def mandel_rotation(euler: np.ndarray) -> np.ndarray:
    """(G, 6, 6) orthogonal Mandel matrices ``Q`` of grains with Bunge angles ``euler`` (G, 3), rad: the lab
    tensor of a symmetric crystal-frame tensor ``t`` is ``Q t`` (``damask.Rotation``'s ``(~rotation) @``,
    as :func:`grain_tensors`), and a stiffness ``Q C Q^T``. Column I is the rotated Mandel basis tensor I.
    """
    import damask

    euler = np.asarray(euler, dtype=np.float64).reshape(-1, 3)
    inverse = ~damask.Rotation.from_Euler_angles(euler)
    basis = np.zeros((6, 3, 3))
    for I, (i, j) in enumerate(VOIGT_PAIRS):
        basis[I, i, j] = basis[I, j, i] = 1.0 if i == j else 1.0 / SQ2
    columns = [mandel_from_tensor2(np.asarray(inverse @ np.broadcast_to(b, (len(euler), 3, 3)))) for b in basis]
    return np.stack(columns, axis=-1)


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
    """``x ** e`` for x >= 0 by multiplications and square roots where ``4 e`` is a whole number below 256
    (n - 1 = 19 of the flow law, a - 1 = 1.25 of the hardening law), else ``x.pow(e)``: a fractional pow
    costs several times a multiplication, and the flow and hardening laws raise every system of every
    voxel to a power in every residual evaluation. The same values as ``pow`` to a few ulp."""
    quarters = 4.0 * float(e)
    if not (quarters.is_integer() and 0 < quarters < 256):
        return x.pow(e)
    k, frac = divmod(int(quarters), 4)
    out = None
    if frac:
        root = x.sqrt()
        out = root if frac == 2 else root.sqrt() if frac == 1 else root * root.sqrt()
    base = x
    while k:
        if k & 1:
            out = base if out is None else out * base
        k >>= 1
        if k:
            base = base * base
    return out


def _flow(tau: torch.Tensor, xi: torch.Tensor, tf: torch.Tensor, n_slip: int, rate: float, n: float):
    """phenopowerlaw shear increments ``dgamma = rate |tau / xi|^n sign(tau)`` (m, N_s) and their derivatives
    d/d tau and d/d xi (1/Pa). Systems ``n_slip:`` are twins: only for tau > 0, and scaled by the untwinned
    fraction ``tf`` (m, 1). ``rate`` = dt * dot_gamma_0 (dimensionless), ``tau``, ``xi`` in Pa.
    """
    ratio = (tau / xi).clamp(-1e3, 1e3)
    powm1 = _power(ratio.abs(), n - 1.0)
    dg = rate * powm1 * ratio
    dgd = (rate * n) * powm1
    if n_slip < tau.shape[1]:
        factor = (ratio[:, n_slip:] > 0).to(tau.dtype) * tf
        dg[:, n_slip:] *= factor
        dgd[:, n_slip:] *= factor
    dgd = dgd / xi
    return dg, dgd, -n * dg / xi


def _rotate(v: torch.Tensor, Q: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """``Q v`` (or ``Q^T v``) per row: Mandel vectors ``v`` (m, 6) by the matrices ``Q`` (m, 6, 6)."""
    return torch.bmm(Q.transpose(1, 2) if inverse else Q, v.unsqueeze(-1)).squeeze(-1)


@dataclass
class State:
    """Plastic state of every voxel of a batch: leading dims (B, V)."""

    eps_p: torch.Tensor  # (B, V, 6) plastic strain
    xi: torch.Tensor  # (B, V, N_s) resistances
    gamma_tw: torch.Tensor  # (B, V, N_tw) accumulated twin shear
    gamma_sl: torch.Tensor  # (B, V, 1) accumulated slip, sum over the slip systems of |gamma_a|

    FIELDS = ("eps_p", "xi", "gamma_tw", "gamma_sl")

    def select(self, keep: torch.Tensor) -> "State":
        return State(*(getattr(self, f)[keep] for f in self.FIELDS))

    def clone(self) -> "State":
        return State(*(getattr(self, f).clone() for f in self.FIELDS))


class Tangents:
    """The tangents ``K`` (B, V, 6, 6) Pa and shear sensitivities ``M`` (B, V, k, 6) of an update, lab frame, for the
    members that ask for them: the fused kernel computes them only then (``compute(members) -> (K, M)``, (b, V,
    ...)), since the solver needs none for the VEs that an update brings into equilibrium; ``eager`` holds
    computed ones."""

    def __init__(self, compute=None, eager: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self._compute, self._eager = compute, eager

    def take(self, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(K, M)`` of the members ``members`` (B,) bool."""
        if self._eager is not None:
            K, M = self._eager
            return (K, M) if bool(members.all()) else (K[members], M[members])
        return self._compute(members.nonzero().squeeze(-1))


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
        chunk: int = 0,
        kernel: str = "auto",
        tangent: str = "consistent",
        loose_tol: float = LOOSE_LOCAL_TOL,
    ) -> None:
        if tangent not in TANGENTS:
            raise ValueError(f"tangent must be one of {', '.join(TANGENTS)}, got {tangent!r}")
        self.tangent = tangent
        self.p, self.elastic, self.twinning = p, elastic, twinning and not elastic
        self.dtype, self.device = dtype, torch.device(device)
        self.offsets = np.cumsum([0] + [len(e) for e in eulers])
        tens = grain_tensors(np.concatenate(eulers), twinning=self.twinning, p=p)
        kw = dict(dtype=dtype, device=self.device)
        self.C = torch.as_tensor(tens["C"], **kw)
        self.S = torch.as_tensor(tens["S"], **kw)
        self.P = torch.as_tensor(tens["P"], **kw)  # (G, N_s, 6)
        # the local update works in the crystal frame, where every voxel has the same Schmid tensors and
        # compliance (single phase): products with them are plain matrix products, not per-voxel ones
        crystal = grain_tensors(np.zeros((1, 3)), twinning=self.twinning, p=p)
        self.Q = torch.as_tensor(mandel_rotation(np.concatenate(eulers)), **kw)  # (G, 6, 6) crystal -> lab
        self.S0 = torch.as_tensor(crystal["S"][0], **kw)  # (6, 6) 1/Pa, symmetric
        self.P0 = torch.as_tensor(crystal["P"][0], **kw)  # (N_s, 6)
        self.PP0 = torch.einsum("ai,aj->aij", self.P0, self.P0).reshape(-1, 36)  # (N_s, 36): p_a p_a^T
        table = system_table(self.twinning, p)
        self.xi_0 = torch.as_tensor(table["xi_0"], **kw)
        self.xi_inf = torch.as_tensor(np.where(np.isinf(table["xi_inf"]), 1.0, table["xi_inf"]), **kw)
        self.twin = torch.as_tensor(table["twin"], device=self.device)
        self.slip = ~self.twin
        self.gamma_char = torch.as_tensor(table["gamma_char"][table["twin"]], **kw)
        self.n_systems = int(self.P.shape[1])
        self.n_twin = int(self.twin.sum())
        self.n_slip = self.n_systems - self.n_twin
        assert not self.twin[: self.n_slip].any(), "slip systems first, then twins"
        # the slip systems of a family start at one xi_0, saturate at one xi_inf and harden by the same
        # Gamma (all interaction coefficients 1), so their resistances stay equal: the hardening law is
        # solved once per family (first system ``slip_first``) and copied to the family (``slip_family``)
        family = table["family"][: self.n_slip]
        first = np.unique(family, return_index=True)[1]
        self.slip_first = torch.as_tensor(first, device=self.device)
        self.slip_family = torch.as_tensor(np.searchsorted(family[first], family), device=self.device)
        # local Newton: |residual|_inf (strain) < local_tol + local_rtol |eps - eps_p^n|_inf. float32
        # round-off of the sums over 30 systems stagnates near 1e-6 relative, and a tighter tolerance
        # made voxels fail and increments cut back; at 1e-5 the curves match float64 to ~3e-7 (tests)
        self.local_tol = local_tol if local_tol is not None else (LOCAL_TOL if dtype == torch.float64 else 1e-12)
        self.local_rtol = 0.0 if dtype == torch.float64 else 1e-5
        self.loose_tol = loose_tol  # the first update of an increment (see update); 0: none loose
        self.max_local = max_local
        self.chunk = chunk or (CPU_CHUNK if self.device.type == "cpu" else GPU_CHUNK)
        self.kernel = choose_kernel(kernel, self.device, dtype)
        if self.kernel == "numba":
            # numpy copies of the constants the fused kernel reads (microfp.cp_kernel)
            self._np = {
                "S0": crystal["S"][0], "P0": crystal["P"][0], "first": first, "family": np.searchsorted(family[first], family),
                "xs_inf": self.xi_inf[self.slip_first].cpu().numpy(), "Q": self.Q.cpu().numpy(), "C": self.C.cpu().numpy(),
            }

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
            gamma_sl=torch.zeros(B, V, 1, **kw),
        )

    # -- kinetics (crystal frame) ----------------------------------------------------------------
    def _flow(self, tau: torch.Tensor, xi: torch.Tensor, hist: torch.Tensor, dt: float):
        """Shear increments ``dgamma`` (m, N_s) at resolved stresses ``tau`` and resistances ``xi``, and
        their derivatives with respect to tau and xi (the untwinned fraction ``hist[:, :1]`` held fixed)."""
        return _flow(tau, xi, hist[:, :1], self.n_slip, dt * self.p.dot_gamma_0, self.p.n)

    def _resistances(self, xi_n: torch.Tensor, shears: torch.Tensor, slip_n: torch.Tensor):
        """Backward-Euler resistances after the accumulated shears of the increment, and d xi / d Gamma.

        ``shears`` (m, 1 or 2): Gamma = sum_slip |dgamma| (and Gamma_tw = sum_twin dgamma). Slip systems
        solve ``xi = xi_n + H(xi) Gamma`` with ``H = h_0 |1 - xi / xi_inf|^a sign(1 - xi / xi_inf)`` by
        Newton (a contraction of ~2 % per fixed-point step, so two Newton steps reach round-off). Twins
        harden as DAMASK v3.0.2 (phenopowerlaw_dotState, c_3 = 1, c_4 = 0): ``dot xi_tw = h_0^tw-sl
        gamma_sl sum_slip |dot gamma| + h_0^tw-tw sum_twin dot gamma``, with ``gamma_sl`` the slip
        accumulated so far (state), i.e. backward Euler ``xi = xi_n + h_0^tw-sl (gamma_sl,n + Gamma) Gamma
        + h_0^tw-tw Gamma_tw``; ``slip_n`` (m, 1) is gamma_sl,n. Returns ``(xi, u)`` (m, N_s), Pa,
        ``u = d xi / d Gamma`` (implicit function theorem on slip, h_0^tw-sl (gamma_sl,n + 2 Gamma) on twins).
        ``xi_n`` must be equal within each slip family (it is: :meth:`initial_state`, and this law keeps it).
        """
        p, ns = self.p, self.n_slip
        G = shears[:, :1]
        xs_n, xs_inf = xi_n.index_select(1, self.slip_first), self.xi_inf[self.slip_first]  # (m, families)
        x = xs_n
        for it in range(3):
            sat = 1.0 - x / xs_inf
            powm1 = _power(sat.abs(), p.a_sl - 1.0)
            H = p.h_0_sl_sl * powm1 * sat
            dH = -p.h_0_sl_sl * p.a_sl * powm1 / xs_inf
            if it == 2:
                break
            x = x - (x - xs_n - H * G) / (1.0 - dH * G)
        xi = torch.empty_like(xi_n)
        u = torch.empty_like(xi_n)
        xi[:, :ns] = x.index_select(1, self.slip_family)
        u[:, :ns] = (H / (1.0 - dH * G)).index_select(1, self.slip_family)
        if self.n_twin:
            xi[:, ns:] = xi_n[:, ns:] + p.h_0_tw_sl * (slip_n + G) * G + p.h_0_tw_tw * shears[:, 1:2]
            u[:, ns:] = p.h_0_tw_sl * (slip_n + 2.0 * G)
        return xi, u

    def _residual(self, y: torch.Tensor, target: torch.Tensor, xi_n: torch.Tensor, hist: torch.Tensor, dt: float):
        """Residual of the local backward-Euler equations for ``y = (sigma, Gamma[, Gamma_tw])`` (m, 6 + k),
        sigma in Pa in the crystal frame, like ``target`` (m, 6), the strain ``eps - eps_p^n``.

        ``S0 sigma + sum_a dgamma_a p0_a - target`` (strain), ``Gamma - sum_slip |dgamma_a|`` and
        ``Gamma_tw - sum_twin dgamma_a`` (shears), with the resistances of :meth:`_resistances`.
        Returns ``(r, dgamma, d dgamma / d tau, d dgamma / d xi, xi, d xi / d Gamma)``.
        """
        ns = self.n_slip
        sig = y[:, :6]
        xi, u = self._resistances(xi_n, y[:, 6:], hist[:, 1:2])
        dg, dgd, dgx = self._flow(sig @ self.P0.T, xi, hist, dt)
        r = torch.empty_like(y)
        r[:, :6] = sig @ self.S0 + dg @ self.P0 - target
        r[:, 6:7] = y[:, 6:7] - dg[:, :ns].abs().sum(-1, keepdim=True)
        if self.n_twin:
            r[:, 7:8] = y[:, 7:8] - dg[:, ns:].sum(-1, keepdim=True)
        return r, dg, dgd, dgx, xi, u

    def _jacobian(self, u: torch.Tensor, dg: torch.Tensor, dgd: torch.Tensor, dgx: torch.Tensor) -> torch.Tensor:
        """(m, 6 + k, 6 + k) derivative of :meth:`_residual`; its (6, 6) block is the one at fixed resistances.

        ``[[S0 + sum_a dgd_a p_a p_a^T, sum_a c_ja p_a], [-sum_a r_ia dgd_a p_a^T, 1 - sum_a r_ia c_ja]]``
        with ``c_0 = dgx u`` and ``c_1 = dgx h_0^tw-tw`` (twins only) the weights of d r_sigma / d shears,
        and ``r_0 = sign(dgamma)`` (slip only), ``r_1 = 1`` (twins only) those of the shear sums.
        """
        m, ns, P0 = dg.shape[0], self.n_slip, self.P0
        k = 1 + (self.n_twin > 0)
        J = dg.new_empty(m, 6 + k, 6 + k)
        c0 = dgx * u
        r0 = torch.sign(dg[:, :ns])
        J[:, :6, :6] = self.S0 + (dgd @ self.PP0).view(m, 6, 6)
        J[:, :6, 6] = c0 @ P0
        J[:, 6, :6] = -((r0 * dgd[:, :ns]) @ P0[:ns])
        J[:, 6, 6] = 1.0 - (r0 * c0[:, :ns]).sum(-1)
        if k == 2:
            c1 = dgx[:, ns:] * self.p.h_0_tw_tw
            J[:, :6, 7] = c1 @ P0[ns:]
            J[:, 7, :6] = -(dgd[:, ns:] @ P0[ns:])
            J[:, 6, 7] = 0.0
            J[:, 7, 6] = -c0[:, ns:].sum(-1)
            J[:, 7, 7] = 1.0 - c1.sum(-1)
        return J

    # -- the update ------------------------------------------------------------------------------
    def _local(self, g, target, xi_n, hist, sig, shears, dt, local_tol=None):
        """Newton (with line search) for the stress and the accumulated shears of voxels ``g`` (m,).

        Fully implicit: the resistances follow the shears inside the iterations (:meth:`_resistances`).
        ``target`` (m, 6) is ``eps - eps_p^n``; ``sig`` (m, 6) and ``shears`` (m, k) are the first guess.
        The iterations run in each voxel's crystal frame (``Q^T`` of its grain rotates lab tensors into it);
        convergence is tested on the lab-frame residual, ``|r|_inf < tol``. Returns lab-frame ``(sig,
        dgamma, d eps_p, xi, shears, K, converged, iterations)``; ``K`` (m, 6, 6) is the tangent at fixed
        resistances, ``(S + sum_a d dgamma_a / d tau_a p_a p_a^T)^-1``, symmetric positive definite.
        """
        m = g.shape[0]
        Q = self.Q[g]  # (m, 6, 6): lab = Q crystal
        Qa = Q  # Qa shrinks to the unconverged voxels below
        y = torch.cat([_rotate(sig, Q, inverse=True), shears], dim=1)
        out = {"y": y.clone(), "dg": torch.zeros_like(xi_n), "xi": xi_n.clone(),
               "K": torch.empty(m, 6, 6, dtype=self.dtype, device=self.device),
               "M": torch.zeros(m, y.shape[1] - 6, 6, dtype=self.dtype, device=self.device)}
        converged = torch.zeros(m, dtype=torch.bool, device=self.device)
        active = torch.arange(m, device=self.device)
        tgt, xin, tfa = _rotate(target, Q, inverse=True), xi_n, hist
        tol = (self.local_tol if local_tol is None else local_tol) + self.local_rtol * target.abs().amax(-1)
        r, dg, dgd, dgx, xi, u = self._residual(y, tgt, xin, tfa, dt)
        iterations = 0
        J_step = None
        for it in range(self.max_local + 1):
            iterations = it
            done = torch.maximum(_rotate(r[:, :6], Qa).abs().amax(-1), r[:, 6:].abs().amax(-1)) < tol
            J = self._jacobian(u, dg, dgd, dgx)
            if done.any():
                d = done.nonzero().squeeze(-1)
                idx = active[d]
                out["y"][idx], out["dg"][idx], out["xi"][idx] = y[d], dg[d], xi[d]
                # the tangent from the Jacobian of the last Newton step (as the fused kernel, which reuses
                # its factors), at the point itself if no step was taken
                out["K"][idx], out["M"][idx] = self._tangent(J[d] if J_step is None else J_step[d], fixed_at=J[d])
                converged[idx] = True
            if done.all() or it == self.max_local:
                break
            keep = (~done).nonzero().squeeze(-1)  # indices: one nonzero for all the copies below
            active, y, r, J, tol, Qa, tgt, xin, tfa = (x[keep] for x in (active, y, r, J, tol, Qa, tgt, xin, tfa))
            J_step = J
            dy = -torch.linalg.solve(J, r.unsqueeze(-1)).squeeze(-1)
            # backtracking line search on |r|^2 (the power law with n = 20 overshoots easily)
            f0 = (r * r).sum(-1)
            new = y + dy
            r, dg, dgd, dgx, xi, u = self._residual(new, tgt, xin, tfa, dt)
            alpha = torch.ones_like(f0)
            pending = torch.arange(new.shape[0], device=self.device)
            f_new = (r * r).sum(-1)
            for _ in range(16):
                accept = torch.isfinite(f_new) & (f_new <= (1.0 - 1e-4 * alpha[pending]) * f0[pending])
                pending = pending[~accept]
                if pending.numel() == 0:
                    break
                alpha[pending] *= 0.5
                new[pending] = y[pending] + alpha[pending, None] * dy[pending]
                parts = self._residual(new[pending], tgt[pending], xin[pending], tfa[pending], dt)
                for full, part in zip((r, dg, dgd, dgx, xi, u), parts):
                    full[pending] = part
                f_new = (parts[0] * parts[0]).sum(-1)
            y = new
        if not bool(converged.all()):
            out["y"][active] = y
        sig = _rotate(out["y"][:, :6], Q)
        deps_p = _rotate(out["dg"] @ self.P0, Q)
        K = Q @ out["K"] @ Q.transpose(1, 2)
        M = out["M"] @ Q.transpose(1, 2)
        if not bool(converged.all()):
            bad = ~converged
            K[bad] = self.C[g[bad]]
            M[bad] = 0.0
        return sig, out["dg"], deps_p, out["xi"], out["y"][:, 6:], K, converged, iterations, M

    def _tangent(self, J: torch.Tensor, fixed_at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crystal-frame tangent (m, 6, 6) and shear sensitivities (m, k, 6) of converged voxels with local
        Jacobians ``J`` (m, 6 + k, 6 + k). ``"consistent"``: the blocks of ``J^-1`` (d sigma / d eps and
        d shears / d eps of the fully implicit update, hardening included), the first symmetrised, where that
        is positive definite; elsewhere, and with ``"fixed"``, ``(S + sum_a dgd_a p_a p_a^T)^-1`` at the
        Jacobians ``fixed_at`` (the converged point) and no shear sensitivities."""
        fixed = torch.linalg.inv(fixed_at[:, :6, :6])
        zero = J.new_zeros(J.shape[0], J.shape[1] - 6, 6)
        if self.tangent != "consistent":
            return fixed, zero
        Ji, info = torch.linalg.inv_ex(J)
        K = Ji[:, :6, :6]
        K = 0.5 * (K + K.transpose(1, 2))
        good = (info == 0) & torch.isfinite(Ji).all(dim=(1, 2))
        good &= torch.linalg.cholesky_ex(torch.where(good[:, None, None], K, fixed))[1] == 0
        return torch.where(good[:, None, None], K, fixed), torch.where(good[:, None, None], Ji[:, 6:, :6], zero)

    def update(self, gid: torch.Tensor, eps: torch.Tensor, state_n: State, sig_guess: torch.Tensor,
               shears_guess: torch.Tensor, dt: float, loose: bool = False, lazy: bool = False):
        """Backward-Euler update of every voxel for total strain ``eps`` (B, V, 6), from ``state_n``.

        ``sig_guess`` (B, V, 6) and ``shears_guess`` (B, V, k) start the local Newton iterations (k = 2
        with twins: Gamma and Gamma_tw, else 1). Returns ``(sig, K, state, shears, ok, iterations)``:
        stress (B, V, 6), tangent (B, V, 6, 6) at fixed resistances, the new state, the shears of the
        increment (B, V, k), (B,) bool whether the local Newton converged in every voxel of each VE, the
        most local Newton iterations, and the shears' sensitivities d shears / d eps (B, V, k, 6), lab frame
        (zero with ``tangent="fixed"``, in voxels that did not converge and in elastic ones), which with the
        tangent predict the local update at a nearby strain. ``loose``: the local Newton stops at
        ``max(local_tol, loose_tol)`` (a first iterate, far from equilibrium, whose stress only sets the
        next Newton step; the solver never accepts equilibrium on such an update). ``lazy``: the tangent and
        the sensitivities come as one :class:`Tangents` in place of ``K`` (and ``None`` in place of the
        sensitivities), computed (fused kernel) for the members that ask for them.
        """
        B, V = gid.shape
        g = gid.reshape(-1)
        if self.elastic:
            Cg = self.C[g]
            sig = torch.einsum("mde,me->md", Cg, (eps - state_n.eps_p).reshape(-1, 6))
            ok = torch.ones(B, dtype=torch.bool, device=self.device)
            M = torch.zeros(B, V, shears_guess.shape[-1], 6, dtype=self.dtype, device=self.device)
            K = Cg.reshape(B, V, 6, 6)
            if lazy:
                K, M = Tangents(eager=(K, M)), None
            return sig.reshape(B, V, 6), K, state_n, shears_guess.clone(), ok, 1, M
        M = B * V
        target = (eps - state_n.eps_p).reshape(M, 6)
        if self.kernel == "numba":
            return self._update_fused(g, target, state_n, sig_guess, shears_guess, dt, self._tol(loose), lazy)
        if self.n_twin:
            frac = (state_n.gamma_tw / self.gamma_char).sum(-1).reshape(M, 1)
            tf = (1.0 - frac).clamp(min=0.0)
        else:
            tf = torch.ones(M, 1, dtype=self.dtype, device=self.device)
        # (M, 2): the untwinned fraction and the accumulated slip at the start of the increment
        hist = torch.cat([tf, state_n.gamma_sl.reshape(M, 1)], dim=1)
        # in chunks: the temporaries of a few 10^4 voxels stay in the allocator's pool, while those of a
        # whole 64^3 grid (~0.4 GB each) go back to the OS and fault in again, which made it 2-3x slower
        xi_n, sig_guess, shears_guess = state_n.xi.reshape(M, -1), sig_guess.reshape(M, 6), shears_guess.reshape(M, -1)
        chunks = [
            self._local(g[c], target[c], xi_n[c], hist[c], sig_guess[c], shears_guess[c], dt, self._tol(loose))
            for c in (slice(i, i + self.chunk) for i in range(0, M, self.chunk))
        ]
        sig, dg, deps_p, xi, shears, K, conv, dsh = (torch.cat([c[k] for c in chunks]) for k in (0, 1, 2, 3, 4, 5, 6, 8))
        most = max(c[7] for c in chunks)
        ok = conv.reshape(B, V).all(dim=1)
        eps_p = state_n.eps_p.reshape(M, 6) + deps_p
        gamma_tw = state_n.gamma_tw
        if self.n_twin:
            gamma_tw = gamma_tw + dg[:, self.n_slip :].reshape(B, V, -1)
        gamma_sl = state_n.gamma_sl + shears[:, :1].reshape(B, V, 1)
        new_state = State(eps_p.reshape(B, V, 6), xi.reshape(B, V, -1), gamma_tw, gamma_sl)
        K = 0.5 * (K + K.transpose(-1, -2)).reshape(B, V, 6, 6)
        dsh = dsh.reshape(B, V, -1, 6)
        if lazy:
            K, dsh = Tangents(eager=(K, dsh)), None
        return sig.reshape(B, V, 6), K, new_state, shears.reshape(B, V, -1), ok, most, dsh


    def _tol(self, loose: bool) -> float:
        return max(self.local_tol, self.loose_tol) if loose else self.local_tol

    def _update_fused(self, g: torch.Tensor, target: torch.Tensor, state_n: State, sig_guess: torch.Tensor,
                      shears_guess: torch.Tensor, dt: float, local_tol: float, lazy: bool = False):
        """:meth:`update` by the fused per-voxel kernel (:mod:`microfp.cp_kernel`, CPU, float64): the same
        local Newton as :meth:`_local`, one voxel at a time; same results to round-off. ``lazy``: the tangents
        are computed when :class:`Tangents` is asked for them, for those members only."""
        from microfp import cp_kernel

        import numba

        B, V = state_n.eps_p.shape[:2]
        M = B * V
        p, c = self.p, self._np
        gamma_tw = state_n.gamma_tw.reshape(M, -1)
        if self.n_twin:
            tf = (1.0 - (state_n.gamma_tw / self.gamma_char).sum(-1)).clamp(min=0.0).reshape(M)
        else:
            tf = torch.ones(M, dtype=self.dtype)
        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        out = cp_kernel.update_voxels(
            g.numpy(), c["Q"], c["C"], target.numpy(), state_n.xi.reshape(M, -1).numpy(), tf.numpy(),
            state_n.gamma_sl.reshape(M).numpy(), sig_guess.reshape(M, 6).numpy(), shears_guess.reshape(M, -1).numpy(),
            S0=c["S0"], P0=c["P0"], n_slip=self.n_slip, first=c["first"], family=c["family"], xs_inf=c["xs_inf"],
            rate=dt * p.dot_gamma_0, n=p.n, a_sl=p.a_sl, h_0_sl_sl=p.h_0_sl_sl, h_0_tw_sl=p.h_0_tw_sl,
            h_0_tw_tw=p.h_0_tw_tw, tol_abs=local_tol, tol_rel=self.local_rtol, max_local=self.max_local,
            consistent=self.tangent == "consistent", tangent=not lazy,
        )
        compute = out.pop("tangent")
        t = {k: torch.from_numpy(v) for k, v in out.items()}
        eps_p = state_n.eps_p.reshape(M, 6) + t["deps_p"]
        if self.n_twin:
            gamma_tw = gamma_tw + t["dg"][:, self.n_slip :]
        gamma_sl = state_n.gamma_sl.reshape(M, 1) + t["shears"][:, :1]
        new_state = State(eps_p.reshape(B, V, 6), t["xi"].reshape(B, V, -1), gamma_tw.reshape(B, V, -1),
                          gamma_sl.reshape(B, V, 1))
        ok = t["converged"].reshape(B, V).all(dim=1)
        nk = shears_guess.shape[-1]
        if lazy:
            def take(members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                K, Ms = compute(members.numpy(), V)
                b = members.shape[0]
                return torch.from_numpy(K).reshape(b, V, 6, 6), torch.from_numpy(Ms).reshape(b, V, nk, 6)

            K, Ms = Tangents(take), None
        else:
            K, Ms = t["K"].reshape(B, V, 6, 6), t["M"].reshape(B, V, nk, 6)
        return (t["sig"].reshape(B, V, 6), K, new_state, t["shears"].reshape(B, V, -1), ok,
                int(out["iterations"].max(initial=0)), Ms)


KERNELS = ("auto", "numba", "torch")
TANGENTS = ("consistent", "fixed")


def choose_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """The local update's implementation: ``"numba"`` (the fused CPU kernel, float64) or ``"torch"``.
    ``"auto"``: numba on a CPU in float64 when numba imports, else torch."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    fits = device.type == "cpu" and dtype == torch.float64
    if kernel == "numba" and not fits:
        raise ValueError(f"the numba kernel runs on the CPU in float64 only (got {device.type}, {dtype})")
    if kernel == "torch" or not fits:
        return "torch"
    try:
        import microfp.cp_kernel  # noqa: F401
    except ImportError:
        if kernel == "numba":
            raise ValueError("kernel 'numba' needs the numba package (pip install numba)") from None
        return "torch"
    return "numba"


# --------------------------------------------------------------------------------------------------
# the Galerkin projection with mixed boundary conditions


class Projection:
    """L2-orthogonal projection onto compatible strain fluctuations + stress-controlled mean components.

    Fields are (B, n, n, n, 6) Mandel. ``mixed`` (6,) bool marks the mean components that are free
    (stress-controlled); the others (strain-controlled) have a prescribed mean and no mean correction.

    ``nyquist`` (even grids): ``"reduced"`` (default) as DAMASK's ``derivative: continuous``
    (spectral_utilities.f90: ``xi1st`` is zero in each component at its Nyquist index): a wave vector's
    Nyquist components are set to zero and the mode is kept with the remaining ones (dropped only where
    none remain); ``"drop"`` (solver v3 and before) projects out every mode with any Nyquist component,
    ~18 % of the modes at 16^3, which over-constrains the strain field: 0.7 % stiffer than DAMASK at the
    elastic-plastic knee of a 16^3 Mg VE, and 0.6 % stiffer than the same VE refined to 32^3 at 1 %.
    """

    def __init__(self, n: int, mixed: torch.Tensor, dtype: torch.dtype, device: torch.device,
                 nyquist: str = "reduced", fused: bool = False) -> None:
        self.n = n
        # fused: the Fourier-space step by microfp.cp_kernel.green (CPU float64), same values to round-off
        self.fused = fused and torch.device(device).type == "cpu" and dtype == torch.float64
        k = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype, device=device)
        kz = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype, device=device)
        kx, ky, kz = torch.meshgrid(k, k, kz, indexing="ij")
        if nyquist not in ("reduced", "drop"):
            raise ValueError(f"nyquist must be 'reduced' or 'drop', got {nyquist!r}")
        if n % 2 == 0 and nyquist == "reduced":
            half = n // 2
            kx, ky, kz = (torch.where(c.abs() == half, 0.0, c) for c in (kx, ky, kz))
        norm = torch.sqrt(kx**2 + ky**2 + kz**2)
        mask = (norm > 0).to(dtype)
        norm = torch.where(norm > 0, norm, 1.0)
        self.nv = [kx / norm, ky / norm, kz / norm]
        if n % 2 == 0 and nyquist == "drop":
            half = n // 2
            mask[(kx.abs() == half) | (ky.abs() == half) | (kz.abs() == half)] = 0.0
        self.mask = mask
        self.mixed = mixed.to(device)
        if self.fused:
            self._np = [t.contiguous().numpy() for t in (*self.nv, mask)]

    def __call__(self, tau: torch.Tensor) -> torch.Tensor:
        n = self.n
        th = torch.fft.rfftn(tau, dim=(1, 2, 3))
        if self.fused:
            from microfp import cp_kernel

            out = torch.from_numpy(cp_kernel.green(th.contiguous().numpy(), *self._np))
            out[:, 0, 0, 0, :] = th[:, 0, 0, 0, :] * self.mixed.to(th.real.dtype)
            return torch.fft.irfftn(out, s=(n, n, n), dim=(1, 2, 3))
        v = [th[..., i] for i in range(6)]
        n1, n2, n3 = (c.to(th.real.dtype) for c in self.nv)  # (float32 fields in a float64 solver: cg_dtype)
        h = 1.0 / SQ2
        T = [[v[0], h * v[5], h * v[4]], [h * v[5], v[1], h * v[3]], [h * v[4], h * v[3], v[2]]]
        Tn = [T[i][0] * n1 + T[i][1] * n2 + T[i][2] * n3 for i in range(3)]
        nTn = Tn[0] * n1 + Tn[1] * n2 + Tn[2] * n3
        nn = (n1, n2, n3)
        mask = self.mask.to(th.real.dtype)
        u = [(2.0 * Tn[i] - nn[i] * nTn) * mask for i in range(3)]
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
        out[:, 0, 0, 0, :] = th[:, 0, 0, 0, :] * self.mixed.to(th.real.dtype)
        return torch.fft.irfftn(out, s=(n, n, n), dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------------
# the solver


@dataclass(frozen=True)
class Load:
    """Uniaxial tension along x: mean eps_xx = rate * t, zero mean normal stresses yy and zz.

    ``shear``: ``"stress"`` (default, the paper's load) holds the mean shear stresses at zero, the mean
    shear strains are free; ``"strain"`` holds the mean shear strains at zero instead (DAMASK's usual
    tensionX load, ``dot_F`` off-diagonals 0), which stiffens an anisotropic VE.
    """

    strain: float = 0.01
    rate: float = 1e-3
    increments: int = 20
    shear: str = "stress"

    def __post_init__(self) -> None:
        if self.shear not in ("stress", "strain"):
            raise ValueError(f"Load.shear must be 'stress' or 'strain', got {self.shear!r}")

    @property
    def stress_controlled(self) -> list[int]:
        """(6,) 1 where the mean (Mandel) component is stress-controlled (zero mean stress), 0 where strain."""
        return [0, 1, 1, 1, 1, 1] if self.shear == "stress" else [0, 1, 1, 0, 0, 0]

    @property
    def times(self) -> np.ndarray:
        return np.linspace(0.0, self.strain / self.rate, self.increments + 1)

    @property
    def strains(self) -> np.ndarray:
        return np.linspace(0.0, self.strain, self.increments + 1)


@dataclass(frozen=True)
class SolverSettings:
    tolerance: float = 1e-5  # |G(sigma)|_rms / |mean sigma|
    max_newton: int = 30
    max_cg: int = 400
    cg_forcing: float = 1e-2  # inexact Newton: CG stops at forcing * initial residual ...
    max_cutbacks: int = 4
    twinning: bool = True
    elastic: bool = False
    dtype: str = "float64"
    device: str = "cpu"
    voxel_chunk: int = 0  # voxels per local-update call; 0: CPU_CHUNK on CPUs, GPU_CHUNK on GPUs
    nyquist: str = "reduced"  # even grids: "reduced" (DAMASK's) or "drop" (solver v3); see Projection
    stress_measure: str = "cauchy"  # reported sigma_xx: "cauchy" (first order in eps_e, as DAMASK's) or "small"
    kernel: str = "auto"  # local update: "numba" (fused CPU kernel, float64), "torch", "auto" (numba where it runs)
    tangent: str = "consistent"  # CG's tangent: "consistent" (hardening included, symmetrised) or "fixed" (v4)
    local_tol: float | None = None  # local Newton tolerance (strain); None: LOCAL_TOL in float64, 1e-12 in float32
    loose_local_tol: float = LOOSE_LOCAL_TOL  # the same for an increment's first update (0: as the others)
    # CG's fields, FFTs and tangent; the residual and the local update stay in dtype. float32: the FFTs ~2.8x
    # faster at 64^3, curves within 2e-8 of float64 CG (16^3), the same Newton and CG iterations
    cg_dtype: str = "float32"


@dataclass
class VEResult:
    """The curve of one VE: mean sigma_xx (Pa, Cauchy unless ``stress_measure="small"``) at each of the
    load's points, and how it went. ``mean_stress`` is the small-strain mean stress."""

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


def cauchy_xx(sig: torch.Tensor, eps_e: torch.Tensor) -> torch.Tensor:
    """xx component of the Cauchy stress of a finite-strain model whose slip is driven by the lattice-frame
    2nd Piola-Kirchhoff stress, to first order in the elastic strain: ``sigma_c = F_e S F_e^T / det F_e``
    with ``S`` the small-strain stress ``sig`` and ``F_e = R (I + eps_e)`` (Mandel, (..., 6) each).

    DAMASK's phenopowerlaw resolves the Mandel stress ``M_p = F_i^T F_i S = S`` (no eigenstrain) on the
    slip systems, and reports ``sigma = F_e S F_e^T / J``: larger than ``R S R^T`` by ``2 eps_e,xx - tr eps_e``
    ~ 0.3-0.5 % once the grains flow (``benchmarks/results/vs-damask-diagnosis.json``). The small-strain
    stress plays the part of ``R S R^T``; this is the stress DAMASK reports for it.
    """
    e, s = eps_e, sig
    return s[..., 0] * (1.0 - e[..., :3].sum(-1) + 2.0 * e[..., 0]) + e[..., 4] * s[..., 4] + e[..., 5] * s[..., 5]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=(1, 2, 3, 4))


def cg(apply_A, rhs: torch.Tensor, tol_abs: torch.Tensor, max_iter: int, fused: bool = False) -> tuple[torch.Tensor, int]:
    """Batched conjugate gradients for SPD ``apply_A`` on (B, n, n, n, 6) fields; per-VE stopping.

    ``fused`` (CPU, float64): the vector updates and dot products by :mod:`microfp.cp_kernel`, three passes per
    iteration in place instead of ~10 torch operations with temporaries; the same iterates to round-off (the
    sums run in index order, one per VE)."""
    if fused:
        return _cg_fused(apply_A, rhs, tol_abs, max_iter)
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


def _cg_fused(apply_A, rhs: torch.Tensor, tol_abs: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int]:
    """:func:`cg` with the fused passes of :mod:`microfp.cp_kernel` (CPU, float64); same steps and stopping."""
    from microfp import cp_kernel

    B = rhs.shape[0]
    # contiguous, so the (B, L) numpy views below share the tensors' memory (zeros_like and clone keep strides)
    x = torch.zeros(rhs.shape, dtype=rhs.dtype)
    r = rhs.contiguous().clone()
    p = r.clone()
    assert all(t.is_contiguous() for t in (x, r, p))
    xv, rv, pv = (t.numpy().reshape(B, -1) for t in (x, r, p))
    rr_np = np.empty(B)
    cp_kernel.cg_dot(rv, rv, rr_np)
    rr = torch.from_numpy(rr_np.copy())
    active = rr.sqrt() > tol_abs
    it = 0
    pAp_np, new_np = np.empty(B), np.empty(B)
    while bool(active.any()) and it < max_iter:
        Ap = apply_A(p).contiguous()
        cp_kernel.cg_dot(pv, Ap.numpy().reshape(B, -1), pAp_np)
        pAp = torch.from_numpy(pAp_np)
        alpha = torch.where(active & (pAp > 0), rr / torch.where(pAp > 0, pAp, 1.0), 0.0)
        cp_kernel.cg_step(xv, rv, pv, Ap.numpy().reshape(B, -1), alpha.numpy(), new_np)
        rr_new = torch.from_numpy(new_np)
        beta = torch.where(active, rr_new / torch.where(rr > 0, rr, 1.0), 0.0)
        cp_kernel.cg_direction(pv, rv, beta.numpy())
        rr = torch.where(active, rr_new, rr)
        active = active & (rr.sqrt() > tol_abs)
        it += 1
    return x, it


@dataclass
class _Batch:
    """VEs solved together and their converged fields at one time; ``ids`` index the caller's list.

    Members may be split off (cut-backs) and joined again in any order: ``ids`` keeps track.
    """

    ids: list[int]
    gid: torch.Tensor  # (B, V) global grain index per voxel
    eps: torch.Tensor  # (B, V, 6) strain
    sig: torch.Tensor  # (B, V, 6) stress
    state: State
    rate: torch.Tensor  # (B, V, 6) strain rate of the last increment (extrapolates the next one)
    shear_rate: torch.Tensor  # (B, V, k) accumulated shear rates of the last increment (the same)
    sig_rate: torch.Tensor  # (B, V, 6) stress rate of the last increment (first guess of the local updates)
    slopes: torch.Tensor  # (B, V, 12 + k) time derivatives of the three rates above (second-order extrapolation)
    dt_last: torch.Tensor  # (B,) length of the last increment, s (0 before the first)

    def select(self, keep: torch.Tensor) -> "_Batch":
        """The members where ``keep`` (B,) bool is true."""
        idx = keep.nonzero().squeeze(-1)
        return _Batch(
            [self.ids[i] for i in idx.tolist()], self.gid[idx], self.eps[idx], self.sig[idx],
            self.state.select(idx), self.rate[idx], self.shear_rate[idx], self.sig_rate[idx], self.slopes[idx],
            self.dt_last[idx],
        )

    @staticmethod
    def cat(parts: list["_Batch"]) -> "_Batch":
        parts = [p for p in parts if p.ids] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        return _Batch(
            [i for p in parts for i in p.ids],
            torch.cat([p.gid for p in parts]),
            torch.cat([p.eps for p in parts]),
            torch.cat([p.sig for p in parts]),
            State(*(torch.cat([getattr(p.state, f) for p in parts]) for f in State.FIELDS)),
            torch.cat([p.rate for p in parts]),
            torch.cat([p.shear_rate for p in parts]),
            torch.cat([p.sig_rate for p in parts]),
            torch.cat([p.slopes for p in parts]),
            torch.cat([p.dt_last for p in parts]),
        )


class _Solver:
    """Increments, Newton iterations and cut-backs of one batched solve; see :func:`solve`."""

    def __init__(self, mat: Material, proj: Projection, n: int, load: Load, settings: SolverSettings,
                 results: list[VEResult]) -> None:
        self.mat, self.proj, self.n, self.load, self.settings, self.results = mat, proj, n, load, settings, results

    def advance(self, batch: _Batch, t0: float, t1: float, depth: int = 0) -> _Batch:
        """The batch at ``t1``. VEs that fail are retried alone in halves of the step (cut-backs), the
        others keep their result; VEs that fail at the deepest cut-back are reported and left out."""
        trial, conv, reasons = self.newton(batch, t0, t1)
        if bool(conv.all()):
            return trial
        failed = ~conv
        if depth < self.settings.max_cutbacks:
            retry = batch.select(failed)
            for i in retry.ids:
                self.results[i].cutbacks += 1
            tm = 0.5 * (t0 + t1)
            retry = self.advance(retry, t0, tm, depth + 1)
            if retry.ids:
                retry = self.advance(retry, tm, t1, depth + 1)
            return _Batch.cat([trial.select(conv), retry])
        for b in failed.nonzero().squeeze(-1).tolist():
            res = self.results[batch.ids[b]]
            res.converged = False
            res.reason = f"{reasons[b] or 'no equilibrium'} (t = {t1:g} s, after {self.settings.max_cutbacks} cut-backs)"
        return trial.select(conv)

    def newton(self, batch: _Batch, t0: float, t1: float) -> tuple[_Batch, torch.Tensor, list[str]]:
        """Newton iterations from ``t0`` to ``t1``: the trial batch, (B,) converged, a reason per failure.

        Converged VEs leave the iterations; the others go on until they converge, fail or run out of
        Newton iterations. Each iteration: stress update of every voxel, equilibrium residual, CG.
        """
        mat, proj, st, n = self.mat, self.proj, self.settings, self.n
        B, V = batch.gid.shape
        dt = t1 - t0
        cg_dtype = getattr(torch, st.cg_dtype)
        # first guesses: the strain, stress and shear rates of the last increment, extrapolated to the middle
        # of this one with their slopes (second order in time)
        ahead = (EXTRAPOLATE * 0.5 * (batch.dt_last + dt)).view(B, 1, 1)
        k6 = 6 + batch.shear_rate.shape[-1]
        eps = batch.eps + (batch.rate + ahead * batch.slopes[..., :6]) * dt
        eps[..., 0] += self.load.rate * t1 - eps[..., 0].mean(dim=1, keepdim=True)
        sig = batch.sig + (batch.sig_rate + ahead * batch.slopes[..., k6:]) * dt
        xi, shears = batch.state.xi.clone(), (batch.shear_rate + ahead * batch.slopes[..., 6:k6]).clamp(min=0.0) * dt
        eps_p, gamma_tw, gamma_sl = batch.state.eps_p.clone(), batch.state.gamma_tw.clone(), batch.state.gamma_sl.clone()
        conv = torch.zeros(B, dtype=torch.bool, device=eps.device)
        bad = torch.zeros_like(conv)
        err = torch.full((B,), float("inf"), dtype=eps.dtype, device=eps.device)
        reasons = [""] * B
        for it in range(st.max_newton):
            loose = it == 0 and mat.loose_tol > 0
            act = (~(conv | bad)).nonzero().squeeze(-1)
            if act.numel() == 0:
                break
            whole = act.numel() == B  # no copies when every member is still iterating

            def part(x: torch.Tensor) -> torch.Tensor:
                return x if whole else x[act]

            s_a, tangents, new, shears_a, ok_a, _, _ = mat.update(
                part(batch.gid), part(eps), batch.state if whole else batch.state.select(act), part(sig), part(shears), dt,
                loose=loose, lazy=True,
            )
            sig[act], xi[act], eps_p[act], shears[act], gamma_sl[act] = s_a, new.xi, new.eps_p, shears_a, new.gamma_sl
            if mat.n_twin:
                gamma_tw[act] = new.gamma_tw
            res = proj(s_a.reshape(-1, n, n, n, 6))
            scale = s_a.mean(dim=1).norm(dim=1).clamp(min=1.0)
            err_a = torch.sqrt(_dot(res, res) / V) / scale
            finite = torch.isfinite(err_a) & torch.isfinite(s_a).all(dim=(1, 2))
            bad_a = ~ok_a | ~finite
            for j, b in enumerate(act.tolist()):
                self.results[batch.ids[b]].newton_iterations += 1
                if bool(bad_a[j]):
                    reasons[b] = "non-finite stress" if not bool(finite[j]) else "stress integration did not converge"
            conv_a = (err_a < st.tolerance) & ~bad_a & (not loose)  # a loose update is never accepted
            err[act], conv[act], bad[act] = err_a, conv_a, bad_a
            if _DEBUG:
                print(f"  t={t1:.3f} err={err_a.tolist()}", flush=True)
            go = ~(conv_a | bad_a)
            if not bool(go.any()):
                continue
            # the tangents of the members still iterating only (the others are in equilibrium)
            K_go, M_go = tangents.take(go)
            # CG in cg_dtype: the Newton step needs only a few digits (CG stops at cg_forcing), so float32
            # fields and FFTs are enough; the residual and the local update stay in dtype
            Kf = K_go.reshape(-1, n, n, n, 6, 6).to(cg_dtype)

            def apply_A(x: torch.Tensor) -> torch.Tensor:
                if mat.kernel == "numba":  # one pass over the tangents (torch's einsum: a batched matmul)
                    from microfp import cp_kernel

                    Kx = cp_kernel.matvec(Kf.numpy().reshape(-1, 6, 6), x.contiguous().numpy().reshape(-1, 6))
                    return proj(torch.from_numpy(Kx).reshape(x.shape))
                return proj(torch.einsum("bxyzij,bxyzj->bxyzi", Kf, x))

            rn = torch.sqrt(_dot(res[go], res[go]))
            tol_abs = torch.maximum(st.cg_forcing * rn, 0.2 * st.tolerance * scale[go] * math.sqrt(V))
            d, cg_it = cg(apply_A, (-res[go]).to(cg_dtype), tol_abs, st.max_cg, fused=mat.kernel == "numba")
            members = act[go]
            for b in members.tolist():
                self.results[batch.ids[b]].cg_iterations += cg_it
            d = d.reshape(-1, V, 6).to(eps.dtype)
            eps[members] += d
            # the next local updates start from the linearised response to the step (stress and shears)
            if mat.kernel == "numba":
                from microfp import cp_kernel

                Kd = torch.from_numpy(cp_kernel.matvec(K_go.numpy().reshape(-1, 6, 6), d.contiguous().numpy().reshape(-1, 6)))
            else:
                Kd = torch.einsum("bvij,bvj->bvi", K_go, d)
            sig[members] += Kd.reshape(-1, V, 6)
            shears[members] += torch.einsum("bvkj,bvj->bvk", M_go, d)
        for b in (~(conv | bad)).nonzero().squeeze(-1).tolist():
            reasons[b] = f"no equilibrium after {st.max_newton} Newton iterations"
        for b in conv.nonzero().squeeze(-1).tolist():
            r = self.results[batch.ids[b]]
            r.last_residual = float(err[b])
            r.max_residual = max(r.max_residual, r.last_residual)
        rates = ((eps - batch.eps) / dt, shears / dt, (sig - batch.sig) / dt)
        old = torch.cat([batch.rate, batch.shear_rate, batch.sig_rate], dim=-1)
        gap = 0.5 * (batch.dt_last + dt)
        slopes = (torch.cat(rates, dim=-1) - old) / gap.view(B, 1, 1)
        slopes[batch.dt_last == 0] = 0.0  # the first increment's rates were guesses, not rates
        trial = _Batch(list(batch.ids), batch.gid, eps, sig, State(eps_p, xi, gamma_tw, gamma_sl), *rates, slopes,
                       torch.full_like(batch.dt_last, dt))
        return trial, conv, reasons


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
    ``log(increment, results)`` is called after each increment with the results still running.
    """
    start = time.perf_counter()
    if settings.stress_measure not in ("cauchy", "small"):
        raise ValueError(f"stress_measure must be 'cauchy' or 'small', got {settings.stress_measure!r}")
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
        chunk=settings.voxel_chunk,
        kernel=settings.kernel,
        tangent=settings.tangent,
        local_tol=settings.local_tol,
        loose_tol=settings.loose_local_tol,
    )
    proj = Projection(n, torch.tensor(load.stress_controlled, dtype=dtype), dtype, device, settings.nyquist,
                      fused=mat.kernel == "numba")
    results = [
        VEResult(strain=load.strains, stress_xx=np.full(load.increments + 1, np.nan), converged=True) for _ in range(B)
    ]
    for r in results:
        r.stress_xx[0] = 0.0
    gid = mat.voxel_grains(grain_ids)
    kw = dict(dtype=dtype, device=device)
    # first guess of the strain rate: uniaxial stress in a transversely isotropic average (nu = 0.3)
    rate = torch.tensor([1.0, -0.3, -0.3, 0.0, 0.0, 0.0], **kw).expand(B, V, 6).clone() * load.rate
    shear_rate = torch.zeros(B, V, 1 + (mat.n_twin > 0), **kw)  # elastic start
    batch = _Batch(list(range(B)), gid, torch.zeros(B, V, 6, **kw), torch.zeros(B, V, 6, **kw),
                   mat.initial_state(gid), rate, shear_rate, torch.zeros(B, V, 6, **kw),
                   torch.zeros(B, V, 12 + shear_rate.shape[-1], **kw), torch.zeros(B, **kw))
    solver = _Solver(mat, proj, n, load, settings, results)
    times = load.times
    for inc in range(1, load.increments + 1):
        batch = solver.advance(batch, float(times[inc - 1]), float(times[inc]))
        if not batch.ids:
            break
        mean = batch.sig.mean(dim=1).cpu().numpy()
        if settings.stress_measure == "cauchy":
            sxx = cauchy_xx(batch.sig, batch.eps - batch.state.eps_p).mean(dim=1).cpu().numpy()
        else:
            sxx = mean[:, 0]
        for b, i in enumerate(batch.ids):
            results[i].stress_xx[inc] = sxx[b]
            results[i].mean_stress = mean[b]
            results[i].residuals.append(results[i].last_residual)
        if log is not None:
            log(inc, [results[i] for i in batch.ids])
    wall = time.perf_counter() - start
    for r in results:
        r.wall_s = wall / B
        if not r.converged:
            r.stress_xx[:] = np.nan
    return results
