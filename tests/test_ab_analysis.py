"""Obs. 2 / Fig. 3 as a claim: the similarity maths on matrices with known answers, verdicts from
planted adapters (safetensors written as lora-split-sum and HydraLoRA save them, at the run ids
the figure6 table implies), the plot, refusals, and one real lora-split-sum run analysed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from safetensors.numpy import save_file
from test_claims import SEEDS, claims_file, write_scored

from hydrabench.atomic import write_json_atomic
from hydrabench.config.tables import load_table
from hydrabench.errors import SpecError
from hydrabench.pipeline.resolve import table_runs
from hydrabench.records.store import OutsideResults, RunStore
from hydrabench.reports.ab_analysis import (
    cosine_similarity,
    principal_angles,
    subspace_similarity,
)
from hydrabench.reports.claims import judge_claims, load_claims, run_claims

PROFILE = "tiny"
SPLIT = "LoRA-Split 4×8, summed reading"
HYDRA = "HydraLoRA"
MODULES = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in ("q", "v")]
R, N, DIM = 8, 4, 128


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# -- the maths ---------------------------------------------------------------------------------


def test_cosine_identical_orthogonal_scaled() -> None:
    x = rng(0).normal(size=(R, DIM))
    assert cosine_similarity(x, x) == pytest.approx(1.0)
    assert cosine_similarity(x, -3.0 * x) == pytest.approx(1.0)  # B·A keeps its sign pair
    y = np.zeros_like(x)
    y[:, DIM // 2:], x[:, DIM // 2:] = 1.0, 0.0  # disjoint supports
    assert cosine_similarity(x, y) == pytest.approx(0.0)
    assert math.isnan(cosine_similarity(x, np.zeros_like(x)))


def test_principal_angles_known_answers() -> None:
    b = rng(1).normal(size=(DIM, R))
    rotation = np.linalg.qr(rng(2).normal(size=(R, R)))[0] @ np.diag(np.arange(1.0, R + 1))
    # B·R spans B's column space: every angle 0, while the flattened matrices differ.
    assert principal_angles(b, b @ rotation) == pytest.approx(np.zeros(R), abs=1e-6)
    assert subspace_similarity(b, b @ rotation) == pytest.approx(1.0)
    assert cosine_similarity(b, b @ rotation) < 0.9
    # Coordinate planes: e1,e2 against e3,e4 orthogonal; e1 against (cos t, sin t) at angle t.
    e = np.eye(DIM)
    assert principal_angles(e[:, :2], e[:, 2:4]) == pytest.approx([math.pi / 2] * 2)
    assert subspace_similarity(e[:, :2], e[:, 2:4]) == pytest.approx(0.0)
    t = 0.3
    tilted = (math.cos(t) * e[:, 0] + math.sin(t) * e[:, 1])[:, None]
    assert principal_angles(e[:, :1], tilted) == pytest.approx([t])
    assert subspace_similarity(e[:, :1], tilted) == pytest.approx(math.cos(t) ** 2)
    # Random 8-dimensional subspaces of R^128 sit near chance (r / dim) = 0.0625.
    sims = [subspace_similarity(rng(s).normal(size=(DIM, R)), rng(s + 100).normal(size=(DIM, R)))
            for s in range(20)]
    assert np.mean(sims) == pytest.approx(R / DIM, rel=0.25)


# -- planted adapters --------------------------------------------------------------------------


def factors(kind: str, seed: int, module: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """N (A, B) pairs: "alike" ones near a common matrix (noise 0.05), "apart" ones drawn
    independently. supported: A's alike, B's apart; contradicted: the reverse; mixed: A's
    alike in layer 0 and B's alike in layer 1 (the per-module differences cancel)."""
    g = rng(1000 * seed + module)
    common_a, common_b = g.normal(size=(R, DIM)), g.normal(size=(DIM, R))
    a_alike = {"supported": True, "contradicted": False, "mixed": module < 2}[kind]

    def draw(common: np.ndarray, alike: bool) -> list[np.ndarray]:
        return [common + 0.05 * g.normal(size=common.shape) if alike
                else g.normal(size=common.shape) for _ in range(N)]

    return draw(common_a, a_alike), draw(common_b, not a_alike)


def plant_artifact(store: RunStore, spec: Any, kind: str) -> Path:
    """The artifact the real method saves: lora-split-sum's peft `cat` merge in combined/
    (A's stacked by rows, B's side by side), or HydraLoRA's one shared A and N B heads."""
    folder = store.artifact_dir(spec.train_id)
    if spec.method == "lora-split-sum":
        (folder / "combined").mkdir(parents=True)
        tensors = {}
        for m, module in enumerate(MODULES):
            a, b = factors(kind, spec.seed, m)
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = np.concatenate(a, axis=0).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = np.concatenate(b, axis=1).astype(np.float32)
        save_file(tensors, str(folder / "combined" / "adapter_model.safetensors"))
        (folder / "combined" / "adapter_config.json").write_text(json.dumps({"r": N * R}))
    else:  # HydraLoRA: its B heads identical, so the note's similarity is 1
        folder.mkdir(parents=True)
        tensors = {}
        for m, module in enumerate(MODULES):
            _, b = factors("contradicted", spec.seed, m)
            tensors[f"{module}.lora_A.weight"] = rng(m).normal(size=(R, DIM)).astype(np.float32)
            tensors[f"{module}.lora_B"] = np.stack([b[0]] * N).astype(np.float32)
            tensors[f"{module}.router.weight"] = np.zeros((N, DIM), np.float32)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "method": "hydralora", "r": R, "num_heads": N, "alpha": 16.0, "dropout": 0.05,
            "target_modules": ["q_proj", "v_proj"], "gate": "softmax", "shared_a": True,
            "base_model_id": "builtin:tiny"}))
    return folder


def plant(store: RunStore, kind: str, seeds: tuple[int, ...] = SEEDS,
          artifacts: bool = True) -> None:
    """figure6's records of the claim's rows (MMLU column), each naming its planted artifact."""
    for row, task, spec in table_runs(load_table("figure6"), PROFILE, seeds):
        if task != "general" or row.label not in (SPLIT, HYDRA):
            continue
        write_scored(store, spec, 200)
        record = json.loads(store.record_path(spec.run_id).read_text())
        record["spec"] = json.loads(json.dumps(spec, default=lambda o: o.__dict__))
        record["train_id"] = spec.train_id
        if artifacts:
            plant_artifact(store, spec, kind)
            record["artifact"] = f"artifacts/{spec.train_id}"
        write_json_atomic(store.record_path(spec.run_id), record)


def claim(**change: Any) -> dict[str, Any]:
    return {"id": "fig3", "words": "A alike, B apart", "where": "Fig. 3", "kind": "analysis",
            "analysis": "ab-similarity", "table": "figure6", "rows": [SPLIT, HYDRA], **change}


@pytest.mark.parametrize(("kind", "expected"), [
    ("supported", "supported"), ("contradicted", "contradicted"), ("mixed", "inconclusive")])
@pytest.mark.parametrize("measure", ["cosine", "subspace"])
def test_verdict_from_planted_adapters(store: RunStore, tmp_path: Path, kind: str,
                                       expected: str, measure: str) -> None:
    plant(store, kind)
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [claim(measure=measure)])),
                              PROFILE, None, store)
    assert verdict.verdict == expected, verdict.note
    effect = verdict.binding
    # 4 modules × 3 seeds of the split row; HydraLoRA's one A adds no unit.
    assert effect is not None and effect.df == 11 and effect.n_seeds == 3
    assert effect.low < effect.value < effect.high
    if kind == "supported":  # alike ≈ 1, independent 8×128 draws ≈ 0.03
        assert effect.value > 0.8 and effect.low > 0
    if kind == "contradicted":
        assert effect.value < -0.8 and effect.high < 0
    if kind == "mixed":
        assert abs(effect.value) < 0.1 and effect.low < 0 < effect.high
    assert f"{HYDRA}: one shared A, B heads' {measure} 1.00" in verdict.note
    assert len(verdict.run_ids) == 6


def test_missing_artifacts_are_not_tested(store: RunStore, tmp_path: Path) -> None:
    plant(store, "supported", artifacts=False)
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [claim()])), PROFILE, None,
                              store)
    assert verdict.verdict == "not tested" and "no artifact" in verdict.note
    # An artifact folder without its adapter file: said, not a traceback.
    plant(store, "supported")
    spec = next(s for r, t, s in table_runs(load_table("figure6"), PROFILE, (0,))
                if r.label == SPLIT and t == "general")
    (store.artifact_dir(spec.train_id) / "combined" / "adapter_model.safetensors").unlink()
    (verdict,) = judge_claims(load_claims(claims_file(tmp_path, [claim()])), PROFILE, None,
                              store)
    assert verdict.verdict == "not tested"
    assert f"no artifacts/{spec.train_id}/combined/adapter_model.safetensors" in verdict.note


def test_an_adapter_file_linked_outside_results_is_refused(store: RunStore,
                                                           tmp_path: Path) -> None:
    plant(store, "supported")
    spec = next(s for r, t, s in table_runs(load_table("figure6"), PROFILE, (0,))
                if r.label == SPLIT and t == "general")
    weights = store.artifact_dir(spec.train_id) / "combined" / "adapter_model.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    weights.rename(outside)
    weights.symlink_to(outside)
    with pytest.raises(OutsideResults, match="leads outside the results folder") as err:
        judge_claims(load_claims(claims_file(tmp_path, [claim()])), PROFILE, None, store)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"analysis": "ab-similarty"}, "did you mean 'ab-similarity'"),
    ({"measure": "cka"}, "unknown measure"),
    ({"rows": []}, "an analysis needs `rows`"),
    ({"rows": ["w/o MoE (LoRA r=8)"]}, "has no per-adapter A and B"),
    ({"rows": ["LoRA-Split 4x8, summed reading"]}, "unknown row of table figure6"),
])
def test_bad_analysis_claims_are_one_line(tmp_path: Path, change: dict[str, Any],
                                          message: str) -> None:
    with pytest.raises(SpecError) as err:
        load_claims(claims_file(tmp_path, [claim(**change)]))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_report_writes_the_fig3_plot_beside_the_claims(store_env: Path) -> None:
    store = RunStore(store_env / "results")
    plant(store, "supported")
    path = store_env / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "hydralora", "title": "t", "claims": [claim()]},
                                   allow_unicode=True))
    paths = run_claims(str(path), report_only=True)
    reports = store_env / "reports"
    assert sorted(p.name for p in paths) == ["claims-fig3.pdf", "claims-fig3.png", "claims.csv",
                                             "claims.md", "claims.tex"]
    from PIL import Image

    with Image.open(reports / "claims-fig3.png") as png:  # 3.3 in at 300 dpi
        assert png.size[0] == 990
    assert (reports / "claims-fig3.pdf").read_bytes().startswith(b"%PDF")
    assert "![Fig. 3](claims-fig3.png)" in (reports / "claims.md").read_text()
    row = pd.read_csv(reports / "claims.csv").iloc[0]
    assert row["verdict"] == "supported" and row["unit"] == "similarity"


def test_no_plot_without_measured_matrices(store_env: Path) -> None:
    plant(RunStore(store_env / "results"), "supported", artifacts=False)
    path = store_env / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "hydralora", "title": "t", "claims": [claim()]},
                                   allow_unicode=True))
    paths = run_claims(str(path), report_only=True)
    assert sorted(p.name for p in paths) == ["claims.csv", "claims.md", "claims.tex"]


# -- a real run --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_real_lora_split_sum_run_is_analysed(tmp_path: Path) -> None:
    """Two LoRAs trained for a few steps on two components of the tiny corpus, in-process, then
    the claim's analysis on its saved artifact: a verdict, a finite interval, the plot."""
    from hydrabench.pipeline.resolve import resolve_spec
    from hydrabench.pipeline.run import execute
    from hydrabench.reports.ab_analysis import write_ab_figure
    from hydrabench.reports.claims import Claim, Verdict, decide, judge_ab, pair_p_values

    store = RunStore(tmp_path / "results")
    spec = resolve_spec("lora-split-sum", "general", overrides={
        "train": {"max_steps": 6}, "eval": {"limit": 2}, "adapter": {"num_splits": 2,
                                                                     "rank": 4}})
    record = store.load(execute(spec, store=store).run_id)
    verdict = Verdict(Claim(id="fig3", words="A alike", where="Fig. 3", kind="analysis",
                            analysis="ab-similarity", rows=("split",)))
    judge_ab(verdict.claim, {"split": [record]}, store, verdict)
    pair_p_values(verdict)
    decide([verdict])
    (effect,) = verdict.effects
    assert verdict.verdict in ("supported", "contradicted", "inconclusive")
    # q_proj and v_proj of the tiny Llama's 2 layers.
    assert effect.df == 3 and math.isfinite(effect.low) and math.isfinite(effect.high)
    assert "cosine: A's" in verdict.note and "subspace: A's" in verdict.note
    paths = write_ab_figure(verdict.analysis, "Fig. 3: A alike", tmp_path / "fig3",
                            "profile tiny · seed 0")
    assert [p.stat().st_size > 0 for p in paths] == [True, True]
