"""Tests for choosing N (number of HydraLoRA heads) by clustering a corpus."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import adjusted_rand_score

from hydrabench.data.clustering import choose_num_clusters, cluster_labels, elbow_index


def planted_corpus(n_clusters: int, per_cluster: int = 40, seed: int = 0) -> list[str]:
    """Texts drawn from ``n_clusters`` disjoint vocabularies, grouped by cluster."""
    rng = random.Random(seed)
    vocabs = [[f"topic{c}word{i}" for i in range(15)] for c in range(n_clusters)]
    return [
        " ".join(rng.choice(vocabs[c]) for _ in range(10))
        for c in range(n_clusters)
        for _ in range(per_cluster)
    ]


@pytest.mark.parametrize("planted", [3, 4, 5])
def test_choose_num_clusters_finds_planted_k(planted: int) -> None:
    k, inertias = choose_num_clusters(planted_corpus(planted), k_min=1, k_max=8, seed=0)
    assert k == planted
    assert len(inertias) == 8
    assert inertias[0] > inertias[planted - 1] > 0


def test_choose_num_clusters_respects_range_and_is_deterministic() -> None:
    texts = planted_corpus(4)
    k, inertias = choose_num_clusters(texts, k_min=2, k_max=6, seed=3)
    assert 2 <= k <= 6 and len(inertias) == 5
    assert choose_num_clusters(texts, k_min=2, k_max=6, seed=3) == (k, inertias)


def test_cluster_labels_recover_planted_split() -> None:
    texts = planted_corpus(4, per_cluster=10)
    labels = cluster_labels(texts, 4, seed=0)
    truth = [i // 10 for i in range(len(texts))]
    assert len(labels) == len(texts) and set(labels) == {0, 1, 2, 3}
    assert adjusted_rand_score(truth, labels) == 1.0


def test_elbow_index_rule() -> None:
    assert elbow_index([10.0, 2.0, 1.5, 1.0, 0.5]) == 1
    assert elbow_index([4.0, 3.0, 2.0, 1.0]) == 0  # straight line: no elbow, smallest k
    assert elbow_index([5.0, 5.0, 5.0]) == 0
    assert elbow_index([3.0, 1.0]) == 0


def test_too_few_texts_or_bad_range() -> None:
    texts = planted_corpus(2, per_cluster=2)
    with pytest.raises(ValueError, match="only 4 texts"):
        choose_num_clusters(texts, k_min=1, k_max=8)
    with pytest.raises(ValueError, match="only 4 texts"):
        cluster_labels(texts, 5)
    with pytest.raises(ValueError, match="k_max"):
        choose_num_clusters(texts, k_min=3, k_max=2)
    with pytest.raises(ValueError, match="k_min must be >= 1"):
        choose_num_clusters(texts, k_min=0, k_max=2)
