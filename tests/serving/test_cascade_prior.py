"""A residual ranker (``train.hard_negatives.prior``) in the cascade: its checkpoint records the two-tower it
was trained on top of, and the cascade adds that retriever's ``u . v`` of each union item to every task's
logit (rows == the slow reference with the prior added per request and item); the prior retriever is
loaded from the record when ``cascade.retrievers`` does not list it; a changed retriever, catalog mode and
``recsys.evaluate`` are refused, as is training on top of a SID decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CASCADE
from job_fixtures import read_output, score_config, tiny_data_config
from test_cascade import assert_rows_match, reference_rows

from recsys.data import prepare_dataset
from recsys.errors import InputError
from recsys.evaluate.config import EvaluateConfig
from recsys.evaluate.run import run_evaluation
from recsys.reliability.digest import file_sha256
from recsys.serving.job import run_scoring
from recsys.testing import torch_threads
from recsys.train.config import HardNegativesConfig
from recsys.train.hard_negatives import HardNegatives


def residual_checkpoint(ckpt: Path, two_tower: Path, out: Path, **changes: str) -> Path:
    """``ckpt`` recorded as trained on top of ``two_tower``'s score (what ``train.hard_negatives.prior`` writes)."""
    state = torch.load(ckpt, weights_only=True)
    state["score_prior"] = {"retriever": str(two_tower.resolve()), "kind": "two_tower",
                            "state_sha256": file_sha256(two_tower / "state.pt"),
                            "meta_sha256": file_sha256(two_tower / "retriever.json"), **changes}
    path = out / "checkpoints" / "step_1.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def residual(trained, retrievers):
    tmp, ckpt = trained
    return residual_checkpoint(ckpt, retrievers["two_tower"], tmp / "residual")


def run(ckpt: Path, out: Path, retrievers: list[Path], **kw: str) -> dict:
    with torch_threads(1):
        return json.loads(run_scoring(score_config(ckpt, out, mode="cascade", **CASCADE, **kw, **{
            "cascade.retrievers": "[" + ",".join(f"'{p}'" for p in retrievers) + "]"})).read_text())


def test_the_cascade_adds_the_recorded_retrievers_score(trained, retrievers, residual, cascade_run):
    tmp, _ = trained
    summary = run(residual, tmp / "cas_residual", [retrievers["two_tower"], retrievers["sid"]])
    assert summary["score_prior"] == str(retrievers["two_tower"].resolve())
    got = read_output(tmp / "cas_residual")
    assert_rows_match(got, reference_rows(residual, retrievers, summary, prior=retrievers["two_tower"]), summary)
    plain = read_output(cascade_run[0])  # the same ranker without the prior writes other scores
    assert not got["score_click"].fill_nan(0).equals(plain["score_click"].fill_nan(0))


def test_the_prior_retriever_is_loaded_from_the_record_when_not_listed(trained, retrievers, residual):
    tmp, _ = trained
    summary = run(residual, tmp / "cas_residual_sid", [retrievers["sid"]])
    assert [r["kind"] for r in summary["retrievers"]] == ["sid"]
    assert summary["score_prior"] == str(retrievers["two_tower"].resolve())


def test_refusals(trained, retrievers, residual, tmp_path):
    tmp, ckpt = trained
    stale = residual_checkpoint(ckpt, retrievers["two_tower"], tmp_path / "stale", state_sha256="0" * 64)
    with pytest.raises(InputError, match="changed since the ranker was trained"):
        run(stale, tmp_path / "o1", [retrievers["two_tower"]])
    with pytest.raises(InputError, match="serve it with mode=cascade"), torch_threads(1):
        run_scoring(score_config(residual, tmp_path / "o2", mode="catalog"))
    with pytest.raises(InputError, match="residual ranker"), torch_threads(1):
        run_evaluation(EvaluateConfig(checkpoint=str(residual), output_dir=str(tmp_path / "o3")))
    ds = prepare_dataset(tiny_data_config(tmp / "data"), progress=False)  # the data `trained` was made on
    with pytest.raises(InputError, match="needs a two-tower retriever"):  # a SID decoder has no per-item score
        HardNegatives(HardNegativesConfig(str(retrievers["sid"]), 8, 2, prior=True), ds.schema, ds.splits["train"],
                      ds.path, 0, 0)
