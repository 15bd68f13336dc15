"""Parameters of the pipeline: the schema of ``params.yaml`` and its loader.

``params.yaml`` is the one source of parameters. DVC passes values through it (``dvc exp run -S
latent_dim=512`` edits the file), and DVC accepts any key, so a typo such as ``latnt_dim`` would be
silently added as a new parameter. Every stage therefore loads the file through :func:`load_params`,
which validates it against the pydantic models below: an unknown key, a wrong type or an
out-of-range value raises :class:`ParamsError` with a one-line message naming the key.

Units follow the paper: ESD and ``resolution`` in length units (``resolution`` = units per voxel,
0.25 for the paper's 64^3 VEs), angles in degrees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from microfp.errors import MicrofpError

TEXTURES_DEG: dict[str, tuple[float, float, float]] = {
    # Table 2 of the paper: Bunge Euler angles (phi1, Phi, phi2) in degrees.
    "brass": (35.0, 45.0, 0.0),
    "copper": (90.0, 35.0, 45.0),
    "cube": (0.0, 0.0, 0.0),
    "goss": (0.0, 45.0, 0.0),
}

Encoder = Literal["resnet12", "resnet18", "resnet34"]
CrystalFamily = Literal["cubic", "hexagonal"]
PositiveFloat = Annotated[float, Field(gt=0)]


class ParamsError(MicrofpError):
    """A parameter file that cannot be used; the message is one line and names the key."""


class _Strict(BaseModel):
    """Base of every parameter block: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


class SetSpec(_Strict):
    """How one set of VEs is generated (paper section 2.1, Tables 1-2)."""

    n: int = Field(gt=0, le=10_000_000, description="number of VEs in the set")
    esd_mean: PositiveFloat | list[PositiveFloat] = Field(
        5.78,
        description="mean equivalent sphere diameter in length units; a list gives an even mixture",
    )
    esd_sigma: float = Field(0.1, ge=0, le=2, description="sigma of ln(ESD) (log-normal)")
    cutoff_sigma: float = Field(5.0, gt=0, le=20, description="min/max ESD cut-off in sigmas")
    aspect: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = Field(
        (1.0, 1.0, 1.0), description="grain aspect ratio along (x, y, z), e.g. [2, 1, 1]"
    )
    texture: Literal["random", "brass", "copper", "cube", "goss"] = "random"
    spread_deg: float = Field(2.0, ge=0, le=90, description="std of the Euler-angle noise, degrees")
    component_fraction: float = Field(
        0.0, ge=0, le=1,
        description="random-texture sets: share of VEs whose grains scatter (spread_deg) around one random "
        "orientation of their own (a random texture component); 0 = all uniformly random (paper)",
    )
    crystal: CrystalFamily = "cubic"

    @field_validator("esd_mean")
    @classmethod
    def _non_empty(cls, v: float | list[float]) -> float | list[float]:
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one ESD")
        return v

    @property
    def esd_means(self) -> list[float]:
        """The ESD means of the mixture (one entry for a plain set)."""
        return list(self.esd_mean) if isinstance(self.esd_mean, list) else [float(self.esd_mean)]


class GenerateParams(_Strict):
    shard_size: int = Field(64, gt=0, le=100_000, description="VEs per HDF5 shard")
    workers: int = Field(0, ge=0, le=1024, description="processes; 0 = all cores")
    sets: dict[str, SetSpec]

    @field_validator("sets")
    @classmethod
    def _set_names(cls, v: dict[str, SetSpec]) -> dict[str, SetSpec]:
        for name in v:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"set name {name!r} must be letters, digits and _")
        return v


class TrainParams(_Strict):
    """Training of the VAE (paper section 2.2, Table 3); see ``microfp.train`` and ``microfp.model``."""

    train_set: str = "train"
    val_set: str = "val"
    epochs: int = Field(5, gt=0, le=100_000)
    limit_train_batches: int = Field(0, ge=0, description="train batches per epoch, each epoch a new shuffled subset; 0 = all")
    batch_size: int = Field(8, gt=0, le=65_536)
    lr: PositiveFloat = 1e-5
    weight_decay: float = Field(1e-5, ge=0)
    hidden_dim: int = Field(8192, gt=0, le=1_000_000)
    base_channels: int = Field(64, gt=0, le=1024, description="channels after the stem (x2 per layer)")
    bottleneck_channels: int = Field(
        32, gt=0, le=4096, description="channels of the 1x1 squeeze before the hidden layer"
    )
    linear_grid: int = Field(
        0, ge=0, le=64, description="> 0: a linear path beside the ResNet, block means of the input on a "
        "linear_grid^3 grid to mu and mu to an interpolated block field added to the output; 0: off (paper)"
    )
    alpha: float = Field(0.999, ge=0, le=1, description="weight of BCE vs FFT-MSE")
    beta: float = Field(1.0, ge=0, description="weight of the KL term; 1 = standard VAE (ELBO per voxel)")
    beta_warmup_epochs: int = Field(0, ge=0, description="linear KL warm-up from 0 over these epochs")
    representation: Literal["euler", "quaternion", "harmonics"] = Field(
        "euler",
        description="euler: 3 normalised Bunge angles, BCE + FFT loss (paper); quaternion: fundamental-zone "
        "quaternions, loss on the disorientation reduced by the crystal symmetry; harmonics: the "
        "symmetry-invariant tensor harmonics of the orientation (9 cubic, 18 hexagonal channels), MSE loss, "
        "decoded to the nearest orientation",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: linear warm-up over warmup_fraction of the steps, then cosine decay to 0"
    )
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of the optimizer steps spent warming up")
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: int | Literal["auto"] = "auto"
    num_nodes: int = Field(1, gt=0)
    strategy: Literal["auto", "ddp", "ddp_find_unused_parameters_true", "fsdp"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "auto"] = "auto"
    num_workers: int = Field(-1, ge=-1, le=256, description="DataLoader workers; -1 = auto")
    threads: int = Field(0, ge=0, le=1024, description="torch CPU threads per process; 0 = torch default")
    cache_mb: int = Field(
        1024, ge=0, le=1_000_000, description="hold a set's shards in memory when smaller than this"
    )
    channels_last: bool = Field(False, description="channels_last_3d memory format (GPU)")
    compile: bool = False
    resume: bool = Field(True, description="continue from last.ckpt when it fits the architecture")
    mlflow: bool = Field(True, description="log to MLflow (MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")


class EvaluateParams(_Strict):
    """Reconstruction metrics, fingerprints and latent-space analysis (paper section 3)."""

    sets: list[str] | None = Field(None, description="sets to evaluate; null = every generated set")
    max_ves_per_set: int = Field(100, gt=0, description="VEs per set for reconstruction metrics")
    batch_size: int = Field(8, gt=0, le=65_536)
    pca_max_fit: int = Field(20_000, gt=0, description="training fingerprints used to fit the PCA")
    interpolation_steps: int = Field(8, gt=1, le=1000, description="N of the linear latent path (eq. 6)")
    interpolation_set: str = Field("val", description="set whose VEs the latent path joins")
    interpolation_pair: tuple[int, int] = Field((0, 1), description="positions of the two VEs in that set")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = the GPU when there is one")
    twopoint_cutoff: PositiveFloat = Field(
        4.0, description="2-point baseline: correlation window half-width in length units (|r| per axis)"
    )
    twopoint_max_fit: int = Field(
        2000, gt=0, description="2-point baseline: training VEs used to fit its PCA (memory: VEs x features)"
    )
    cluster_neighbors: int = Field(10, gt=1, le=1000, description="spectral clustering: k of the k-NN graph")
    train_set: str = Field("train", description="set the PCA is fitted on")
    mlflow: bool = Field(True, description="log evaluate/analyse metrics to MLflow (as train does)")
    cluster_groups: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "texture": ["brass", "copper", "cube", "goss"],
            "texture_tight": ["brass_tight", "copper_tight", "cube_tight", "goss_tight"],
            "morphology": ["small", "large", "elongated"],
            "morphology_large_elongated": ["large", "elongated"],
        },
        description="spectral-clustering problems: name -> sets (one class each); missing sets skip a group",
    )

    @field_validator("cluster_groups")
    @classmethod
    def _groups(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, sets in v.items():
            if not name.replace("_", "").isalnum():
                raise ValueError(f"group name {name!r} must be letters, digits and _")
            if len(set(sets)) != len(sets) or len(sets) < 2:
                raise ValueError(f"group {name!r} needs at least two different sets, got {sets}")
        return v

    @field_validator("interpolation_pair")
    @classmethod
    def _distinct_pair(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] == v[1] or min(v) < 0:
            raise ValueError(f"needs two different non-negative VE positions, got {list(v)}")
        return v


class SimulateParams(_Strict):
    """Crystal-plasticity simulation of uniaxial tension (paper section 2.3); see ``microfp.simulate``.

    The Mg material parameters are fixed (``microfp.cp.MG``, DAMASK's phenopowerlaw Mg example).
    Keys that change results (strain, strain_rate, increments, twinning, tolerance, dtype, backend)
    are part of the resume key of each VE; the others (batching, workers, device) are not.
    """

    sets: list[str] = Field(default_factory=lambda: ["hcp"], description="sets to simulate")
    max_ves: int = Field(32, gt=0, description="VEs simulated per set (the first ones)")
    grid: int = Field(
        0, ge=0, le=1024, description="voxels per edge of the CP grid: the VE subsampled (nearest voxel); 0 = as stored"
    )
    backend: Literal["spectral", "damask"] = "spectral"
    strain: PositiveFloat = Field(0.01, le=0.05, description="final eps_xx (small-strain solver: <= 5 %)")
    strain_rate: PositiveFloat = 1e-3
    increments: int = Field(20, gt=0, le=100_000)
    twinning: bool = Field(True, description="tension/compression twins as unidirectional pseudo-slip")
    tolerance: float = Field(1e-5, gt=0, lt=1, description="equilibrium: |G(sigma)|_rms / |mean sigma|")
    max_newton: int = Field(30, gt=0, le=1000, description="Newton iterations per increment")
    max_cg: int = Field(400, gt=0, le=100_000, description="CG iterations per Newton iteration")
    max_cutbacks: int = Field(4, ge=0, le=20, description="halvings of a failed increment")
    batch_size: int = Field(2, gt=0, le=4096, description="VEs solved together in one batched solve (one task)")
    workers: int = Field(0, ge=0, le=100_000, description="local Dask worker processes; 0 = cores / threads")
    threads_per_worker: int = Field(1, gt=0, le=1024, description="torch threads of each worker")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    dtype: Literal["float64", "float32"] = Field(
        "float64", description="float32: about 1.8x faster on CPU, curves within ~1e-6 of float64"
    )
    voxel_chunk: int = Field(
        0, ge=0, le=2**30, description="voxels per local-update call; 0 = auto (8192 on CPUs, 2^18 on GPUs)"
    )


class SurrogateParams(_Strict):
    """Fingerprint -> stress-strain surrogate (paper section 2.4)."""

    epochs: int = Field(200, gt=0, le=1_000_000)
    batch_size: int = Field(128, gt=0, le=1_000_000)
    lr: PositiveFloat = 1e-5
    weight_decay: float = Field(1e-5, ge=0)
    hidden: int = Field(512, gt=0, le=1_000_000)
    test_fraction: float = Field(0.2, gt=0, lt=1)


class Params(_Strict):
    """The whole of ``params.yaml``."""

    seed: int = Field(ge=0, lt=2**32)
    ve_size: int = Field(ge=16, le=1024, description="voxels per edge of a VE")
    resolution: PositiveFloat = Field(description="length units per voxel")
    latent_dim: int = Field(gt=0, le=65_536)
    encoder: Encoder
    generate: GenerateParams
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    simulate: SimulateParams = SimulateParams()
    surrogate: SurrogateParams = SurrogateParams()

    @field_validator("ve_size")
    @classmethod
    def _divisible_by_16(cls, v: int) -> int:
        if v % 16:
            raise ValueError(f"must be divisible by 16 (the encoder halves it four times), got {v}")
        return v

    @model_validator(mode="after")
    def _sets_exist(self) -> "Params":
        for key in ("train_set", "val_set"):
            name = getattr(self.train, key)
            if name not in self.generate.sets:
                raise ValueError(f"train.{key}: set {name!r} is not in generate.sets")
        return self

    @model_validator(mode="after")
    def _linear_grid_divides_ve_size(self) -> "Params":
        grid = self.train.linear_grid
        if grid and self.ve_size % grid:
            raise ValueError(f"train.linear_grid: must be 0 or divide ve_size ({self.ve_size}), got {grid}")
        return self

    @property
    def box_size(self) -> float:
        """Edge length of a VE in length units (ve_size * resolution)."""
        return self.ve_size * self.resolution


def _one_line(err: ValidationError, source: str) -> str:
    """First error of a pydantic ValidationError as 'source: dotted.key: message'."""
    first = err.errors()[0]
    # Drop pydantic's union-branch tags (e.g. "constrained-float") so only real keys remain.
    parts = [str(p) for p in first["loc"] if isinstance(p, int) or str(p).replace("_", "").isalnum()]
    # errors of whole-file checks (model validators) have no location: their message names the keys
    key = ".".join(parts)
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see params.yaml for the known keys)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = first["msg"].replace("Value error, ", "")
    more = len(err.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key + ': ' if key else ''}{msg}{tail}".replace("\n", " ")


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise :class:`ParamsError` with a one-line message."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys to values at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_one_line(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a parameter file (``params.yaml`` or ``configs/paper.yaml``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ParamsError(f"{path}: cannot read parameter file ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    return parse_params(raw, str(path))
