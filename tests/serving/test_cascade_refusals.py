"""``mode=cascade``: the retriever artifact's refusals, in process (``load_retriever`` / ``save_retriever``) and
through the CLI (five ``python -m recsys.score`` runs launched together). Apart from ``test_cascade.py`` so
that xdist runs the two files on two workers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from job_fixtures import SETTINGS, make_checkpoint, make_retrievers, synthetic_sids, tiny_data_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))
from hostile_helpers import assert_refused, run_cli  # noqa: E402  (the CLI harness of the hostile-input suite)

from recsys.data.item_categories import collect_item_categories
from recsys.errors import InputError
from recsys.reliability.checkpoint import load_checkpoint
from recsys.retrieval.artifact import load_retriever, save_retriever
from recsys.retrieval.encoder import TwoTowerEncoder
from recsys.retrieval.sid_decoder import SidDecoder
from recsys.serving.catalog import catalog_items
from recsys.serving.load import load_ranker

CPU = torch.device("cpu")


def test_load_retriever_refusals_in_process(trained, retrievers, tmp_path):
    tmp, ckpt = trained
    _, schema, _ = load_ranker(ckpt, CPU)
    catalog = catalog_items(schema, None, collect_item_categories([], schema))
    (tmp_path / "text").write_text("not an artifact")
    for bad, needle in [(tmp_path / "text", "is a file"), (tmp_path / "missing", "does not exist")]:
        with pytest.raises(InputError, match=needle):
            load_retriever(bad, schema, catalog)
    ranker, max_s = load_ranker(ckpt, CPU)[0], int(load_checkpoint(ckpt)["max_s_tokens"])
    tower = save_retriever(tmp_path / "tower", TwoTowerEncoder(ranker, 4), schema, max_s_tokens=max_s,
                           dataset_dir=tmp_path / "trained_on")
    assert load_retriever(tower, schema, catalog, dataset_dir=tmp_path / "trained_on").index is not None
    with pytest.raises(InputError, match="built for another schema or catalog.*served_on"):
        load_retriever(tower, schema, catalog, dataset_dir=tmp_path / "served_on")  # another dataset dir
    garbage = tmp_path / "garbage"
    shutil.copytree(retrievers["sid"], garbage)
    (garbage / "state.pt").write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="not a readable torch file"):
        load_retriever(garbage, schema, catalog)
    with pytest.raises(InputError, match="is a file, not a retriever artifact"):  # overwrite never hits a non-artifact
        save_retriever(tmp_path / "text", TwoTowerEncoder(ranker, 4), schema, max_s_tokens=max_s, dataset_dir=None,
                       overwrite=True)
    assert (tmp_path / "text").read_text() == "not an artifact"
    with pytest.raises(InputError, match="already exists"):
        save_retriever(retrievers["sid"], SidDecoder(ranker.cfg, 2, 50), schema, max_s_tokens=max_s, dataset_dir=None,
                       backbone=ranker, codes=synthetic_sids(schema.num_items))


@pytest.fixture(scope="module")
def hostile(trained, retrievers):
    """Artifacts the CLI must refuse: one built for another dataset (other item count), one whose code table
    leaves an item without a SID, and a text file."""
    tmp, ckpt = trained
    root = tmp / "hostile_retrievers"
    data = tiny_data_config(root / "data")
    data.synthetic.num_items = 150
    other = make_retrievers(root / "other", make_checkpoint(root / "run", data))
    ranker, schema, _ = load_ranker(ckpt, CPU)
    codes = synthetic_sids(schema.num_items)
    codes[7] = -1
    torch.manual_seed(0)
    no_sid = save_retriever(root / "no_sid", SidDecoder(ranker.cfg, 2, int(codes.max()) + 1), schema,
                            max_s_tokens=int(load_checkpoint(ckpt)["max_s_tokens"]), dataset_dir=None,
                            backbone=ranker, codes=codes)
    text = root / "retriever.txt"
    text.write_text("two_tower\n")
    return {"other": other["two_tower"], "no_sid": no_sid, "text": text}


def cli(ckpt: Path, out: Path, retr: list[Path], *extra: str):
    return run_cli("recsys.score", f"checkpoint={ckpt}", f"output_dir={out}", *SETTINGS, "mode=cascade",
                   "cascade.retrievers=[" + ",".join(f"'{p}'" for p in retr) + "]", *extra)


REFUSALS = ("retrieve_k", "top_n", "rrf_k", "other_schema", "no_sid", "text")


@pytest.fixture(scope="module")
def refused(trained, retrievers, hostile) -> dict[str, subprocess.CompletedProcess]:
    """Every CLI refusal of this file, launched together (three at a time: each is seconds of imports
    before its check); case -> the finished process. Output directories: ``<tmp>/refused_<case>``."""
    tmp, ckpt = trained
    both = [retrievers["two_tower"], retrievers["sid"]]
    runs = {"retrieve_k": (both, "cascade.retrieve_k=500", "cascade.top_n=5"),
            "top_n": (both, "cascade.retrieve_k=4", "cascade.top_n=6"),
            "rrf_k": (both, "cascade.fusion=rrf", "cascade.rrf_k=-1"),
            "other_schema": ([hostile["other"]],), "no_sid": ([hostile["no_sid"]],), "text": ([hostile["text"]],)}
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {case: pool.submit(cli, ckpt, tmp / f"refused_{case}", *runs[case]) for case in REFUSALS}
        return {case: f.result() for case, f in futures.items()}


@pytest.mark.parametrize("case", REFUSALS)
def test_cli_refusals(trained, hostile, refused, case):
    tmp, ckpt = trained
    out, proc = tmp / f"refused_{case}", refused[case]
    if case == "retrieve_k":
        m = load_ranker(ckpt, CPU)[1].num_items - 1  # every id but the padding id 0
        assert_refused(proc, "cascade.retrieve_k=500", f"catalog's {m} items")
    elif case == "top_n":
        assert_refused(proc, "cascade.top_n=6", "cascade.retrieve_k=4")
    elif case == "rrf_k":
        assert_refused(proc, "cascade.rrf_k must be >= 0, got -1")
    elif case == "other_schema":
        built = json.loads((hostile["other"] / "retriever.json").read_text())["fingerprint"]["num_items"]
        here = load_ranker(ckpt, CPU)[1].num_items
        assert built != here
        assert_refused(proc, str(hostile["other"]), "another schema or catalog", f"'num_items': {built}",
                       f"'num_items': {here}")
    elif case == "no_sid":
        assert_refused(proc, str(hostile["no_sid"]), "1 catalog item(s) have no semantic ID", "[7]")
    else:
        assert_refused(proc, str(hostile["text"]), "not a retriever artifact directory")
    assert not out.exists()  # refused before the output directory is touched
