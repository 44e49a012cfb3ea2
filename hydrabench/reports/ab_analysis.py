"""Obs. 2 / Fig. 3 of HydraLoRA as a claim (`kind: analysis`, `analysis: ab-similarity`): LoRAs
trained on different components of the data have alike A matrices and different B matrices.

Read from the trained artifacts of a claim's rows (through the run store, which resolves an
artifact inside results/ only), never retrained: per adapter and adapted module its A (r × in)
and B (out × r). `lora-split-sum` keeps its n per-component LoRAs as one peft `cat` merge (A's
stacked by rows, B's by columns: chunks of r), `lora-split-routed` as split_k folders, and
HydraLoRA's layer format (hydralora, lora-split, ...) as N B heads with one shared A (or N A's
stacked). Per module and seed the pairwise similarity of the A's and of the B's, averaged over
pairs; the claim's effect is the mean of (A-similarity − B-similarity) over layers, modules,
rows and seeds, with a 95% t-interval over those units. A row whose heads share one A adds its
B heads' similarity to the note only. Fig. 3's plot is a PCA (not the paper's t-SNE) of the
flattened matrices.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hydrabench.errors import SpecError
from hydrabench.records.store import RunRecord, RunStore

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ANALYSES = ("ab-similarity",)
MEASURES = ("cosine", "subspace")
SPLIT_DIR_METHODS = {"lora-split-sum": "combined", "lora-split-routed": "split"}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


# -- the maths ---------------------------------------------------------------------------------


def cosine_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """|cos| of the flattened matrices: 1 identical (or one a multiple of the other), 0
    orthogonal. Absolute, since B·A is unchanged when both change sign; NaN for a zero matrix."""
    u, v = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
    norms = float(np.linalg.norm(u) * np.linalg.norm(v))
    return abs(float(u @ v)) / norms if norms > 0 else math.nan


def _basis(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis of x's column space (its numerical rank's worth of columns)."""
    u, s, _ = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    if not s.size or s[0] == 0:
        return u[:, :0]
    return u[:, s > s[0] * max(x.shape) * np.finfo(np.float64).eps]


def principal_angles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The principal angles (radians, smallest first) between the column spaces of x and y: as
    many as the smaller space has dimensions."""
    cosines = np.linalg.svd(_basis(x).T @ _basis(y), compute_uv=False)
    return np.arccos(np.clip(cosines, 0.0, 1.0))


def subspace_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Mean cos² of the principal angles between the column spaces: 1 for the same space (in
    any basis: B and B·R, R invertible), 0 for orthogonal ones; NaN for a zero matrix."""
    angles = principal_angles(x, y)
    return float(np.mean(np.cos(angles) ** 2)) if angles.size else math.nan


def similarity(x: np.ndarray, y: np.ndarray, measure: str, factor: str) -> float:
    """Two A's (factor "A": their row spaces, the inputs they read) or two B's ("B": their column
    spaces, the outputs they write) by `measure`."""
    if measure == "cosine":
        return cosine_similarity(x, y)
    return subspace_similarity(x.T, y.T) if factor == "A" else subspace_similarity(x, y)


def mean_pairwise(matrices: Sequence[np.ndarray], measure: str, factor: str) -> float | None:
    """The mean similarity over every pair (NaN pairs left out); None with fewer than two."""
    values = [similarity(x, y, measure, factor) for x, y in combinations(matrices, 2)]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else None


def chance_subspace(rank: int, dim: int) -> float:
    """Expected subspace_similarity of two random rank-dimensional subspaces of R^dim."""
    return min(1.0, rank / dim)


# -- the matrices in an artifact ---------------------------------------------------------------


@dataclass(frozen=True)
class ModuleFactors:
    """One adapted module's factors: an A (r × in) per adapter, or one shared; a B (out × r)
    per adapter or head."""

    a: tuple[np.ndarray, ...]
    b: tuple[np.ndarray, ...]


class NoFactors(SpecError):
    """A record whose artifact holds no A/B matrices this analysis reads (one line)."""


def _read(path: Path, store: RunStore, run_id: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise NoFactors(f"run {run_id}: no {path.relative_to(store.root)} in its artifact")
    store.inside(path, f"run {run_id}: its adapter file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise NoFactors(f"run {run_id}: unreadable {path.name} ({err})") from None


def peft_factors(tensors: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module → (A, B) of a peft LoRA file (keys `<module>.lora_A.weight`)."""
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            b = tensors.get(f"{module}.lora_B.weight")
            if b is not None:
                out[module.removeprefix("base_model.model.")] = (a, b)
    return out


def split_cat(a: np.ndarray, b: np.ndarray, n: int) -> ModuleFactors:
    """n LoRAs from peft's `cat` merge of them: A's stacked by rows, B's side by side."""
    if a.shape[0] % n or a.shape[0] != b.shape[1]:
        raise NoFactors(f"a rank {a.shape[0]} merge does not split into {n} LoRAs")
    r = a.shape[0] // n
    return ModuleFactors(tuple(a[k * r:(k + 1) * r] for k in range(n)),
                         tuple(b[:, k * r:(k + 1) * r] for k in range(n)))


def hydra_factors(tensors: dict[str, np.ndarray], r: int, heads: int,
                  shared_a: bool) -> dict[str, ModuleFactors]:
    """HydraLoRA's layer format: lora_B [N, out, r]; lora_A [r, in] shared or [N·r, in]."""
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        b = tensors.get(f"{module}.lora_B")
        if b is None or b.ndim != 3 or b.shape[0] != heads or a.shape[0] != (
                r if shared_a else heads * r):
            raise NoFactors(f"{module}: shapes do not match r={r}, {heads} heads")
        a_split = (a,) if shared_a else tuple(a[k * r:(k + 1) * r] for k in range(heads))
        out[module] = ModuleFactors(a_split, tuple(b[k] for k in range(heads)))
    return out


def artifact_factors(record: RunRecord, store: RunStore) -> dict[str, ModuleFactors]:
    """Module → its factors, read from the record's own artifact (store.load resolved it inside
    the results folder); NoFactors when there is none to read."""
    if record.artifact is None:
        raise NoFactors(f"run {record.run_id}: no artifact")
    n = int((record.spec or {}).get("adapter", {}).get("num_splits") or 0)
    layout = SPLIT_DIR_METHODS.get(record.method)
    if layout == "combined":
        tensors = _read(record.artifact / "combined" / WEIGHTS, store, record.run_id)
        factors = {m: split_cat(a, b, n) for m, (a, b) in peft_factors(tensors).items()}
    elif layout == "split":
        per_split = [peft_factors(_read(record.artifact / f"split_{k}" / WEIGHTS, store,
                                        record.run_id)) for k in range(n)]
        factors = {m: ModuleFactors(tuple(s[m][0] for s in per_split),
                                    tuple(s[m][1] for s in per_split))
                   for m in per_split[0] if all(m in s for s in per_split)} if n else {}
    else:
        config_path = record.artifact / CONFIG
        try:
            config = json.loads(store.inside(config_path, f"run {record.run_id}: its adapter "
                                             "config").read_text())
        except (OSError, ValueError):
            config = {}
        if not isinstance(config, dict) or config.get("method") != "hydralora":
            raise NoFactors(f"run {record.run_id}: {record.method}'s artifact has no per-adapter "
                            "A and B this analysis reads")
        try:
            factors = hydra_factors(_read(record.artifact / WEIGHTS, store, record.run_id),
                                    int(config["r"]), int(config["num_heads"]),
                                    bool(config.get("shared_a", True)))
        except (KeyError, TypeError, ValueError) as err:
            raise NoFactors(f"run {record.run_id}: its {CONFIG} lacks r, num_heads ({err})"
                            ) from None
    if not factors:
        raise NoFactors(f"run {record.run_id}: no LoRA factors in its artifact")
    return factors


def analysable(method: str) -> bool:
    """Whether a method's artifacts hold per-adapter factors this analysis reads."""
    from hydrabench.methods import get_method
    from hydrabench.methods.hydralora_layer import save_hydralora

    return method in SPLIT_DIR_METHODS or get_method(method).save is save_hydralora


# -- the claim ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitSimilarity:
    """One module of one run: its A's and B's mean pairwise similarity by each measure."""

    row: str
    seed: int
    module: str
    a: dict[str, float | None]  # measure → value (None: one shared A)
    b: dict[str, float | None]
    chance_a: float  # subspace similarity of random spaces of the same rank and dimension
    chance_b: float


@dataclass
class AbResult:
    """What the claim measured and what the plot draws: per (row, seed) each adapter's A and B,
    flattened, every module scaled to unit norm and the modules concatenated."""

    units: list[UnitSimilarity] = field(default_factory=list)
    points: dict[tuple[str, int], tuple[list[np.ndarray], list[np.ndarray]]] = field(
        default_factory=dict)


def _unit_vector(x: np.ndarray) -> np.ndarray:
    flat = np.ravel(x).astype(np.float64)
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 0 else flat


def analyse(row: str, record: RunRecord, factors: dict[str, ModuleFactors],
            result: AbResult) -> None:
    """Add one run's modules to `result`."""
    for module, f in sorted(factors.items()):
        rank, dim_in = f.a[0].shape
        result.units.append(UnitSimilarity(
            row, record.seed, module,
            {m: mean_pairwise(f.a, m, "A") for m in MEASURES},
            {m: mean_pairwise(f.b, m, "B") for m in MEASURES},
            chance_subspace(rank, dim_in), chance_subspace(rank, f.b[0].shape[0])))
    modules = [factors[m] for m in sorted(factors)]
    result.points[(row, record.seed)] = tuple(  # type: ignore[assignment]
        [np.concatenate([_unit_vector(getattr(f, side)[k]) for f in modules])
         for k in range(len(getattr(modules[0], side)))] for side in ("a", "b"))


@dataclass(frozen=True)
class AbDifference:
    """Mean (A − B similarity) over layer-modules × runs, with its 95% t-interval."""

    mean: float
    low: float
    high: float
    se: float | None  # None: one layer-module, no spread
    df: int | None
    n_seeds: int


def ab_difference(units: Sequence[UnitSimilarity], measure: str) -> AbDifference | None:
    """Mean (A − B similarity) by `measure` over the units with an A per adapter, a 95%
    t-interval over them; None without such a unit."""
    from hydrabench.reports.cells import mean_ci

    diffs = [u.a[measure] - u.b[measure] for u in units  # type: ignore[operator]
             if u.a[measure] is not None and u.b[measure] is not None]
    if not diffs:
        return None
    mean, sem, ci95 = mean_ci(diffs)
    low, high = (mean, mean) if ci95 is None else (mean - ci95, mean + ci95)
    return AbDifference(mean, low, high, sem, len(diffs) - 1 if sem is not None else None,
                        len({u.seed for u in units}))


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def ab_note(units: Sequence[UnitSimilarity], measure: str) -> str:
    """The means behind the effect, by both measures, and the B heads of rows with one A."""
    paired = [u for u in units if u.a[measure] is not None]
    parts = []
    if paired:
        parts.append(f"{len(paired)} layer-modules × runs")
        for m in MEASURES:
            a, b = _mean([u.a[m] for u in paired]), _mean([u.b[m] for u in paired])
            chance = (f" (random spaces: A {_mean([u.chance_a for u in paired]):.2f}, "
                      f"B {_mean([u.chance_b for u in paired]):.2f})" if m == "subspace" else "")
            parts.append(f"{m}: A's {a:.2f}, B's {b:.2f}{chance}")
    for row in dict.fromkeys(u.row for u in units if u.a[measure] is None):
        b = _mean([u.b[measure] for u in units if u.row == row])
        parts.append(f"{row}: one shared A, B heads' {measure} "
                     + ("n/a" if b is None else f"{b:.2f}"))
    return "; ".join(parts)


# -- Fig. 3 ------------------------------------------------------------------------------------


def pca_2d(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The vectors' first two principal-component coordinates (zeros where there are fewer)."""
    x = np.stack(vectors)
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    coords = np.zeros((len(vectors), 2))
    k = min(2, len(s))
    coords[:, :k] = u[:, :k] * s[:k]
    return coords


MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def plot_ab(result: AbResult, title: str, caption: str) -> Figure:
    """Two panels on one scale: the A's and the B's of every adapter (colour: its component or
    head; marker: the row), each panel the PCA of its matrices with every run's adapters centred
    on their mean, so that what shows is how far one run's adapters lie apart (A's of different
    runs differ by their random initialisation, which the claim is not about)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from hydrabench.reports.figures import COLORS, FONT_PT, VALUE_PT, _figure, _footer, _wrap

    fig = _figure(2.6)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    groups = list(result.points)
    rows = list(dict.fromkeys(row for row, _ in groups))
    for side, ax, name in ((0, axes[0], "A matrices"), (1, axes[1], "B matrices")):
        vectors = [v - np.mean(result.points[g][side], axis=0)
                   for g in groups for v in result.points[g][side]]
        coords = iter(pca_2d(vectors))
        for row, seed in groups:
            for k in range(len(result.points[(row, seed)][side])):
                x, y = next(coords)
                ax.scatter(x, y, s=10, marker=MARKERS[rows.index(row) % len(MARKERS)],
                           color=COLORS[k % len(COLORS)], edgecolors="black", linewidths=0.3)
        ax.set_title(name, fontsize=FONT_PT)
        ax.set_xlabel("PC 1", fontsize=FONT_PT)
        ax.tick_params(labelsize=FONT_PT, length=2, pad=1.5)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
        ax.grid(alpha=0.3, linewidth=0.4)
    axes[0].set_ylabel("PC 2", fontsize=FONT_PT)
    heads = max(len(result.points[g][1]) for g in groups)
    markers = [Line2D([], [], linestyle="", marker=MARKERS[i % len(MARKERS)], color="white",
                      markeredgecolor="black", markeredgewidth=0.4, markersize=3,
                      label=_wrap(row, 24)) for i, row in enumerate(rows)]
    colours = [Line2D([], [], linestyle="", marker="o", color=COLORS[k % len(COLORS)],
                      markeredgecolor="black", markeredgewidth=0.3, markersize=3, label=str(k))
               for k in range(heads)]
    legend = {"fontsize": VALUE_PT, "frameon": False, "title_fontsize": VALUE_PT,
              "handletextpad": 0.2, "columnspacing": 0.8}
    fig.legend(handles=markers, loc="outside upper left", ncols=min(len(rows), 2),
               title="row", **legend)
    fig.legend(handles=colours, loc="outside upper right", ncols=min(heads, 4),
               title="component / head", **legend)
    _footer(fig, title, caption)
    return fig


def write_ab_figure(result: AbResult | None, title: str, stem: Path, caption: str) -> list[Path]:
    """<stem>.png and .pdf of a claim's matrices; nothing without measured ones."""
    from hydrabench.reports.figures import _save

    if not isinstance(result, AbResult) or not result.points:
        return []
    caption = "\n".join(textwrap.fill(line, 80) for line in [
        "PCA of the flattened matrices (not the paper's t-SNE): each module's matrix scaled to "
        "unit norm, modules concatenated, one point per adapter, each run's adapters centred on "
        "their mean; both panels on one scale, so spread is dissimilarity within a run",
        caption])
    fig = plot_ab(result, title, caption)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for path in paths:
        _save(fig, path)
    return paths
