"""quant -> train (SID items) -> checkpoint -> scoring, with an item that gets its SID only at scoring time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from recsys.data import RequestLoader, prepare_dataset
from recsys.quant import SemanticIds
from recsys.quant.config import register_configs as register_quant
from recsys.quant.content import read_content_parquet, synthetic_content, write_content_parquet
from recsys.quant.run import quantize
from recsys.reliability.checkpoint import load_checkpoint
from recsys.serving.config import ScoreConfig
from recsys.serving.config import register_configs as register_score
from recsys.serving.job import load_ranker, resolve_checkpoint, run_scoring
from recsys.train.config import RunConfig
from recsys.train.config import register_configs as register_train
from recsys.train.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
register_quant()
register_train()
register_score()


def compose_cfg(name: str, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_object(compose(name, overrides=list(overrides)))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sid_e2e")
    data = [f"data.root={tmp / 'data'}", "data=tiny"]
    run: RunConfig = compose_cfg("train", *data, "model=debug", f"output_dir={tmp / 'train'}")
    ds = prepare_dataset(run.data, progress=False)
    test_items = next(iter(RequestLoader(ds.splits["test"], ds.schema, run.data.loader))).cand["item_id"].values()
    unseen = int(test_items[0])  # a test candidate whose content vector is withheld from the quantizer
    ids, vecs = synthetic_content(run.data.synthetic, 8, 0.5, 1.0, 1.0)
    keep = ids != unseen
    write_content_parquet(tmp / "known.parquet", ids[keep], vecs[keep])
    write_content_parquet(tmp / "all.parquet", ids, vecs)
    sids_path = quantize(compose_cfg("quant", *data, "content.source=parquet", f"content.path={tmp / 'known.parquet'}",
                                     "levels=2", "codebook_size=8", f"output_dir={tmp / 'quant'}", "progress=false"))
    report = train(compose_cfg("train", *data, "model=debug", f"output_dir={tmp / 'train'}", "train.progress=false",
                               "train.max_steps=3", "model.attention_backend=torch", "model.item_embedding.mode=sid",
                               f"model.item_embedding.sid_path={sids_path}"))
    return {"tmp": tmp, "unseen": unseen, "sids": sids_path, "report": report, "ds": ds, "run": run}


def test_quant_outputs_unique_sids_and_a_report(pipeline):
    sids = SemanticIds.load(pipeline["sids"])
    have = sids.codes[:, 0] >= 0
    assert not have[pipeline["unseen"]] and not have[0]
    assert len(torch.unique(sids.codes[have], dim=0)) == int(have.sum())
    rep = json.loads((pipeline["sids"].parent / "report.json").read_text())
    errs = rep["recon_error_per_level"]
    assert len(errs) == 2 and errs[1] < errs[0] < 1.0
    assert 0.0 <= rep["collision_rate_before_fix"] <= 1.0 and len(rep["levels"]) == 2
    assert (pipeline["sids"].parent / "report.png").stat().st_size > 1000


def test_rebalanced_last_level_gives_distinct_embedded_tuples(pipeline, tmp_path):
    tmp = pipeline["tmp"]
    common = [f"data.root={tmp / 'data'}", "data=tiny", "content.source=parquet", f"content.path={tmp / 'all.parquet'}",
              "levels=2", "codebook_size=16", "progress=false"]
    plain = SemanticIds.load(quantize(compose_cfg("quant", *common, f"output_dir={tmp_path / 'a'}")))
    path = quantize(compose_cfg("quant", *common, "collision_fix=rebalance_last", f"output_dir={tmp_path / 'b'}"))
    rebal, rep = SemanticIds.load(path), json.loads((path.parent / "report.json").read_text())
    have = plain.codes[:, 0] >= 0

    def shared(codes: torch.Tensor) -> int:  # items whose embedded (semantic) columns are not unique
        _, inv, counts = torch.unique(codes[have, :-1], dim=0, return_inverse=True, return_counts=True)
        return int((counts[inv] > 1).sum())

    assert shared(plain.codes) > 0 and shared(rebal.codes) < shared(plain.codes)
    assert rep["collision_rate_before_extra_level"] == pytest.approx(shared(rebal.codes) / int(have.sum()))
    assert rep["rebalanced_items"] > 0 and rep["collision_fix"] == "rebalance_last"
    assert len(torch.unique(rebal.codes[have], dim=0)) == int(have.sum())
    assert torch.equal(rebal.codes[:, 0], plain.codes[:, 0])  # only the last semantic column moves


def test_checkpoint_carries_the_sid_map_and_loads_weights_only(pipeline):
    state = load_checkpoint(resolve_checkpoint(pipeline["tmp"] / "train"))  # torch.load(weights_only=True)
    saved = SemanticIds.from_dict(state["item_sid"])
    assert torch.equal(saved.codes, SemanticIds.load(pipeline["sids"]).codes)
    ie = state["config"]["model"]["item_embedding"]
    assert ie["mode"] == "sid" and ie["sid_columns"] == 2 and ie["sid_codebook_size"] == 8
    assert "tokenizer.embeddings.seq_tables.embeddings.item_id_table.weight" not in state["model"]
    torch.testing.assert_close(state["model"]["tokenizer.embeddings.item_sid"], saved.codes[:, :2])


def test_unseen_item_gets_a_valid_sid_and_a_score_at_scoring_time(pipeline):
    tmp, unseen = pipeline["tmp"], pipeline["unseen"]
    ckpt = resolve_checkpoint(tmp / "train")
    plain, schema, _ = load_ranker(ckpt, torch.device("cpu"))
    model, _, _ = load_ranker(ckpt, torch.device("cpu"), item_content=str(tmp / "all.parquet"))
    assert (plain.tokenizer.embeddings.item_sid[unseen] == -1).all()
    got = model.tokenizer.embeddings.item_sid[unseen]
    assert ((got >= 0) & (got < 8)).all()
    ids, vecs = read_content_parquet(tmp / "all.parquet")
    expect = SemanticIds.from_dict(load_checkpoint(ckpt)["item_sid"]).with_new_items(ids, vecs)
    assert torch.equal(model.tokenizer.embeddings.item_sid, expect.codes[:, :2])
    assert len(torch.unique(expect.codes[1:], dim=0)) == schema.num_items - 1  # unique tuples incl. the new item
    others = torch.ones(schema.num_items, dtype=torch.bool)
    others[unseen] = False
    assert torch.equal(model.tokenizer.embeddings.item_sid[others], plain.tokenizer.embeddings.item_sid[others])
    batch = next(iter(RequestLoader(pipeline["ds"].splits["test"], schema, pipeline["run"].data.loader)))
    is_unseen = batch.cand["item_id"].values() == unseen
    with torch.no_grad():
        a, b = model(batch), plain(batch)
    assert torch.isfinite(a).all() and is_unseen.any()
    assert not torch.allclose(a[is_unseen], b[is_unseen])  # scored by its new SID, not the "no SID" row

    cfg: ScoreConfig = compose_cfg("score", f"checkpoint={tmp / 'train'}", f"output_dir={tmp / 'score'}",
                                   "progress=false", f"item_content={tmp / 'all.parquet'}")
    summary = json.loads(run_scoring(cfg).read_text())
    assert summary["complete"] and summary["requests"] > 0


def test_item_content_on_an_id_checkpoint_is_refused(pipeline, tmp_path):
    tmp = pipeline["tmp"]
    train(compose_cfg("train", f"data.root={tmp / 'data'}", "data=tiny", "model=debug", f"output_dir={tmp_path}",
                      "train.progress=false", "train.max_steps=1", "model.attention_backend=torch"))
    with pytest.raises(ValueError, match="no semantic IDs"):
        load_ranker(resolve_checkpoint(tmp_path), torch.device("cpu"), item_content=str(tmp / "all.parquet"))


def test_quant_config_composes_and_typos_fail():
    cfg = compose_cfg("quant", "output_dir=/tmp/x", "method=multi_expert", "data=ml100k")
    assert cfg.rq_vae.beta == 0.25 and cfg.method.value == "multi_expert"
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_cfg("quant", "mehtod=rq_vae")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg("quant", "method=rqvae")
    with pytest.raises(ValueError, match="sid_path"):
        train(compose_cfg("train", "data=tiny", "model=debug", "output_dir=/tmp/6/never",
                          "model.item_embedding.mode=sid"))
