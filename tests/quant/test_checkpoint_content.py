"""``content.source=checkpoint``: the item table of a ranker checkpoint or of a retriever's backbone (the
two-tower keeps it under ``encoder.ranker.``) is the content; no table, or two, is a clear error."""

from __future__ import annotations

import pytest
import torch

from recsys.errors import InputError
from recsys.quant.content import ITEM_TABLE_KEY, checkpoint_content
from recsys.reliability.checkpoint import CheckpointManager


@pytest.mark.parametrize("prefix", ["", "encoder.ranker."])
def test_the_item_table_of_a_ranker_or_a_retriever_backbone(tmp_path, prefix):
    table = torch.randn(6, 4)
    path = CheckpointManager(tmp_path).save(1, {"model": {f"{prefix}{ITEM_TABLE_KEY}": table, "other.weight": torch.ones(2)}})
    ids, vecs = checkpoint_content(path)
    assert torch.equal(ids, torch.arange(1, 6)) and torch.equal(vecs, table[1:])


@pytest.mark.parametrize(("keys", "says"), [([], "has no item id table"),
                                            (["a." + ITEM_TABLE_KEY, "b." + ITEM_TABLE_KEY], "holds 2 item id tables")])
def test_no_table_or_two_tables_are_refused(tmp_path, keys, says):
    path = CheckpointManager(tmp_path).save(1, {"model": {k: torch.randn(3, 2) for k in keys}})
    with pytest.raises(InputError, match=says):
        checkpoint_content(path)
