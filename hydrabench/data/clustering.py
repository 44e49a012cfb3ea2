"""Choosing the number of HydraLoRA heads ``N`` by clustering the training corpus.

The paper picks ``N`` from the structure of the data: texts are embedded (here TF-IDF), K-means
is run for a range of ``k``, and ``N`` is the elbow of the inertia curve. The elbow rule is the
"kneedle" idea (Satopaa et al., 2011): normalise ``k`` and the inertia to ``[0, 1]`` and take the
``k`` whose point lies farthest below the straight line joining the first and last points.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import spmatrix
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import TfidfVectorizer

# Fixed so the result depends only on ``seed``, not on the sklearn default of the day.
N_INIT = 10


def _features(texts: list[str]) -> spmatrix:
    return TfidfVectorizer().fit_transform(texts)


def _check_k(texts: list[str], k: int, what: str) -> None:
    if k < 1:
        raise ValueError(f"{what} must be >= 1, got {k}")
    if len(texts) < k:
        raise ValueError(f"cannot form {what}={k} clusters from only {len(texts)} texts")


def _kmeans(features: spmatrix, k: int, seed: int) -> KMeans:
    return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(features)


def elbow_index(values: list[float]) -> int:
    """Index of the elbow of a decreasing curve (kneedle rule on evenly spaced x).

    Returns 0 when no point lies strictly below the chord (flat, straight or concave curve),
    i.e. when there is no elbow the smallest candidate wins.
    """
    y = np.asarray(values, dtype=np.float64)
    span = y.max() - y.min()
    if len(y) < 3 or span == 0:
        return 0
    y = (y - y.min()) / span
    x = np.linspace(0.0, 1.0, len(y))
    # Signed distance below the chord; the chord's length is a constant factor for the
    # argmax, so the vertical gap is enough.
    chord = y[0] + (y[-1] - y[0]) * x
    gap = chord - y
    best = int(np.argmax(gap))
    # Tolerance so rounding on an exactly straight curve does not invent an elbow.
    return best if gap[best] > 1e-9 else 0


def choose_num_clusters(
    texts: list[str], k_min: int = 1, k_max: int = 8, seed: int = 0
) -> tuple[int, list[float]]:
    """Pick ``N`` as the elbow of the K-means inertia curve over TF-IDF features.

    Returns the chosen ``k`` and the inertias for ``k = k_min .. k_max`` (inclusive).
    """
    if k_max < k_min:
        raise ValueError(f"k_max ({k_max}) must be >= k_min ({k_min})")
    _check_k(texts, k_min, "k_min")
    _check_k(texts, k_max, "k_max")
    features = _features(texts)
    inertias = [float(_kmeans(features, k, seed).inertia_) for k in range(k_min, k_max + 1)]
    return k_min + elbow_index(inertias), inertias


def cluster_labels(texts: list[str], k: int, seed: int = 0) -> list[int]:
    """K-means cluster id (``0 .. k-1``) of every text, to split a corpus into ``k`` parts."""
    _check_k(texts, k, "k")
    return [int(label) for label in _kmeans(_features(texts), k, seed).labels_]
