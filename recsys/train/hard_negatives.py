"""Hard negatives for a cascade's ranker: items a retriever ranks high for the request, appended to its
listed candidates with label 0 on every task.

A ranker trained only on its log's impressions never sees the items a retriever puts beside the true one;
in a cascade those are exactly what it must push down. Per training request ``b`` (``B`` requests, listed
candidates ``C_b``):

1. the retriever (``recsys.retrieval.artifact``, trained on the same dataset) returns its top
   ``retrieve_k`` items for the request's history (history items included: the served cascade may
   retrieve them too);
2. ``num`` of them that are not among the request's listed items (nor, with ``exclude_user_positives``,
   among the items the same user has a positive for at or after this request in the train split:
   ``UserPositives``, which the retriever ranks high and which would be false negatives; the user's
   history items stay eligible; with ``history_first`` they are drawn before any other) are drawn uniformly
   without replacement (fewer when fewer remain; none, with ``retrieved_only``, when the top K holds none
   of the request's listed items); their categories come from the train split
   (``collect_item_categories``);
3. candidates ``[C_b listed | n_b negatives]`` (jagged ``[sum (C_b + n_b)]``), labels of the listed ones as
   read (``listed_label=keep``) or 1 on every task (``positive``, leave-one-out next-item data), the
   negatives' 0;
4. with ``prior``: every candidate's two-tower score ``u . v`` as the batch's ``prior`` (added to the
   ranker's logits: the ranker learns a residual over the retriever's order; validation batches get it too).

The draw uses a generator seeded by ``(seed, rank, epoch, batch index)``, so a resumed run draws the
negatives the uninterrupted run drew (the bit-exact resume guarantee holds).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.baselines.common import merged_history
from recsys.data.batch import RequestBatch
from recsys.data.candidates import with_request_candidates
from recsys.data.item_categories import collect_item_categories
from recsys.data.schema import DataSchema
from recsys.data.user_items import UserPositives
from recsys.errors import InputError
from recsys.retrieval.artifact import load_retriever
from recsys.train.config import HardNegativesConfig, ListedLabel


class ItemSet:
    """Every item ``1 .. num_items-1`` with its category: the retriever's catalog (``CatalogLike``)."""

    def __init__(self, category: np.ndarray) -> None:
        self.items = np.arange(1, category.size, dtype=np.int64)
        self.cats = category[self.items]


class HardNegatives:
    """``augment(batch, epoch, index) -> batch`` with retrieved negatives (see the module docstring)."""

    def __init__(self, cfg: HardNegativesConfig, schema: DataSchema, train_files: list[Path], dataset_dir: Path,
                 seed: int, rank: int) -> None:
        if cfg.retriever is None:
            raise InputError("train.hard_negatives.retriever is not set")
        self.category = collect_item_categories(train_files, schema).category
        catalog = ItemSet(self.category)
        if cfg.retrieve_k > catalog.items.size:
            raise InputError(f"train.hard_negatives.retrieve_k={cfg.retrieve_k} exceeds the catalog's "
                             f"{catalog.items.size} items; lower it")
        self.retriever = load_retriever(cfg.retriever, schema, catalog, torch.device("cpu"), dataset_dir)
        if cfg.prior and self.retriever.kind != "two_tower":
            raise InputError(f"train.hard_negatives.prior needs a two-tower retriever (a per-item score); "
                             f"{cfg.retriever} is a {self.retriever.kind!r} retriever")
        self.cfg, self.seed, self.rank, self.kinds = cfg, seed, rank, list(schema.sequences)
        self.user_positives = (UserPositives(train_files, schema, cfg.listed_label == ListedLabel.positive)
                               if cfg.exclude_user_positives else None)

    def _generator(self, epoch: int, index: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, self.rank, epoch, index]).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))

    def draw(self, batch: RequestBatch, epoch: int, index: int) -> list[np.ndarray]:
        """Per request, its negative item ids ``[n_b]`` (``n_b <= num``), in the order drawn."""
        ids, _ = self.retriever.retrieve(batch.to("cpu"), self.cfg.retrieve_k)  # [B, K], -1 = none
        ids = ids.numpy()
        listed = batch.cand["item_id"].values().cpu().numpy()
        off = batch.cand_offsets.cpu().numpy()
        users, ts = batch.user_id.cpu().numpy(), batch.request_ts.cpu().numpy()
        keys = torch.rand(ids.shape, generator=self._generator(epoch, index)).numpy()  # [B, K], in [0, 1)
        hist = merged_history(batch, self.kinds, 0) if self.cfg.history_first else None  # every kind's events
        h_items, h_off = (hist.item.cpu().numpy(), hist.offsets.cpu().numpy()) if hist is not None else (None, None)
        out = []
        for b in range(ids.shape[0]):
            found = np.isin(ids[b], listed[off[b]:off[b + 1]])
            if self.cfg.retrieved_only and not found.any():
                out.append(ids[b][:0])  # the retriever missed this request's items: nothing to order
                continue
            ok = (ids[b] > 0) & ~found
            if self.user_positives is not None:
                ok &= ~self.user_positives.taken_later(int(users[b]), int(ts[b]), ids[b])
            key = keys[b]
            if h_items is not None:  # the request's history items first: their keys move below every other's
                key = key - np.isin(ids[b], h_items[h_off[b]:h_off[b + 1]])
            pick = np.flatnonzero(ok)[np.argsort(key[ok], kind="stable")[:self.cfg.num]]
            out.append(ids[b][pick])
        return out

    def stream(self, batches: Iterable[RequestBatch], epoch: int, first: int) -> Iterator[RequestBatch]:
        """``augment`` over an epoch's batches, the first being batch ``first`` of epoch ``epoch``."""
        for index, batch in enumerate(batches, start=first):
            yield self.augment(batch, epoch, index)

    @torch.no_grad()
    def augment(self, batch: RequestBatch, epoch: int, index: int) -> RequestBatch:
        """``batch`` with every request's candidates ``[listed | negatives]`` and their labels."""
        negatives = self.draw(batch, epoch, index)
        dev = batch.cand_offsets.device
        listed = batch.cand["item_id"].values()
        listed_cats = batch.cand["category"].values()
        off = batch.cand_offsets.cpu().tolist()
        labels = batch.labels if self.cfg.listed_label == ListedLabel.keep else torch.ones_like(batch.labels)
        items, cats, rows = [], [], []
        for b, neg in enumerate(negatives):
            n = torch.as_tensor(neg, dtype=listed.dtype, device=dev)
            items += [listed[off[b]:off[b + 1]], n]
            cats += [listed_cats[off[b]:off[b + 1]], torch.as_tensor(self.category[neg], dtype=listed_cats.dtype,
                                                                      device=dev)]
            rows += [labels[off[b]:off[b + 1]], labels.new_zeros(neg.size, labels.shape[1])]
        sizes = torch.as_tensor([0] + [off[b + 1] - off[b] + neg.size for b, neg in enumerate(negatives)])
        out = with_request_candidates(batch, torch.cat(items), torch.cat(cats), sizes.cumsum(0).to(dev),
                                      torch.cat(rows))
        return self.with_prior(out) if self.cfg.prior else out

    @torch.no_grad()
    def with_prior(self, batch: RequestBatch) -> RequestBatch:
        """``batch`` with its candidates' retriever scores as :attr:`RequestBatch.prior` (``cfg.prior``)."""
        out = copy.copy(batch)
        out.prior = self.retriever.candidate_scores(batch.to("cpu")).to(batch.cand_offsets.device)
        return out

    def record(self) -> dict[str, Any]:
        """What a checkpoint of a ranker trained with ``prior`` records: the retriever a server must add."""
        ident = self.retriever.identity
        return {"retriever": str(Path(self.cfg.retriever).resolve()), "kind": ident["kind"],
                "state_sha256": ident["state_sha256"], "meta_sha256": ident["meta_sha256"]}


__all__ = ["HardNegatives", "ItemSet"]
