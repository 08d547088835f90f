"""Retriever artifacts: a trained (or freshly initialised) retriever on disk, loaded for a given schema and
catalog, refusing one built for anything else.

Shapes: ``B`` requests, ``M`` catalog items, ``k`` results per request, ``I`` item-id space, ``L`` SID levels.

Layout: a directory, written atomically (built as ``.<name>.tmp-<pid>`` beside it, every file fsynced,
then renamed into place and the parent fsynced; a reader never sees half an artifact):

* ``retriever.json``: ``format``, ``kind`` (``two_tower`` / ``sid``), ``fingerprint`` (what it was built
  for: ``num_items``, ``num_categories``, ``schema_digest`` = digest of the schema's JSON, ``dataset_dir``
  it was trained on or null, and for ``sid`` the ``sid_codes_digest`` of its code table),
  ``backbone_config`` (the ranker ``ModelConfig`` whose tokenizer and S stack it reads) and
  ``max_s_tokens``, the kind's sizes (``out_dim``; ``num_levels`` / ``vocab_size``), the faiss
  ``index`` settings (two-tower).
* ``state.pt`` (``torch.save``, loaded with ``weights_only=True``): ``backbone`` (that ranker's
  state), ``model`` (the retriever's own parameters: the two-tower projections and empty-history
  vector, or the SID decoder), ``codes [I, L]`` (sid: ``SemanticIds.codes``, ``-1`` rows = no SID).

Item vectors (two-tower) are **not saved**: the faiss index is built at load time from the item tables
(``TwoTowerEncoder.item_vectors`` of the catalog's items and categories). They are a function of the
saved state and of the categories the job reads, so saving them would store a second copy that could
disagree with the catalog being served (another ``items_file``, other categories); the cost is one
embedding lookup + projection over the catalog, small next to ranking.

The backbone is the retriever's own copy of the ranker it was trained with (it need not be the ranking
checkpoint: the tower may have been trained jointly or separately), rebuilt from ``backbone_config``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from recsys.baselines.common import candidate_owner
from recsys.data.batch import RequestBatch
from recsys.data.schema import DataSchema
from recsys.errors import InputError
from recsys.model.config import ModelConfig
from recsys.model.ranker import OneTransRanker
from recsys.reliability.atomic import fsync_dir
from recsys.reliability.digest import file_sha256, json_digest
from recsys.retrieval.encoder import TwoTowerEncoder
from recsys.retrieval.index import IndexConfig, ItemIndex
from recsys.retrieval.sid_decoder import SidDecoder, user_prefix
from recsys.retrieval.sid_search import sid_beam_search
from recsys.retrieval.sid_trie import SidTrie

FORMAT = "recsys.retriever/1"
META, STATE = "retriever.json", "state.pt"
KINDS = ("two_tower", "sid")


class CatalogLike(Protocol):
    """The served candidate set (``recsys.serving.ranking.Catalog``): ``items [M]`` ascending ids >= 1,
    ``cats [M]`` their categories."""

    items: np.ndarray
    cats: np.ndarray


def schema_digest(schema: DataSchema) -> str:
    return json_digest(json.loads(schema.to_json()))


def codes_digest(codes: torch.Tensor) -> str:
    """SHA-256 (16 hex) of a ``[I, L]`` code table's shape and int64 bytes."""
    arr = np.ascontiguousarray(codes.detach().cpu().long().numpy())
    return hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()[:16]


def _fingerprint(schema: DataSchema, dataset_dir: str | Path | None, codes: torch.Tensor | None) -> dict[str, Any]:
    fp: dict[str, Any] = {"num_items": schema.num_items, "num_categories": schema.num_categories,
                          "schema_digest": schema_digest(schema),
                          "dataset_dir": str(Path(dataset_dir).resolve()) if dataset_dir else None}
    if codes is not None:
        fp["sid_codes_digest"] = codes_digest(codes)
    return fp


def save_retriever(path: str | Path, model: TwoTowerEncoder | SidDecoder, schema: DataSchema, *,
                   max_s_tokens: int, dataset_dir: str | Path | None, backbone: OneTransRanker | None = None,
                   codes: torch.Tensor | None = None, index: IndexConfig | None = None,
                   overwrite: bool = False) -> Path:
    """Write ``model`` as a retriever artifact directory at ``path`` (atomically; see the module docstring).

    Two-tower: ``model.ranker`` is the backbone. SID: ``backbone`` = the ranker whose prefix the decoder
    reads, ``codes [I, L]`` the catalog's SIDs. ``max_s_tokens``: the backbone's (sizes its pyramid).
    An existing ``path`` is refused unless ``overwrite`` and it is a retriever artifact (then replaced,
    still atomically for readers of the new name)."""
    path = Path(path)
    if isinstance(model, TwoTowerEncoder):
        kind, backbone = "two_tower", model.ranker
        own = {k: v for k, v in model.state_dict().items() if not k.startswith("ranker.")}
        sizes: dict[str, Any] = {"out_dim": int(model.user_proj.out_features)}
        codes = None
    elif isinstance(model, SidDecoder):
        if backbone is None or codes is None:
            raise InputError("save_retriever of a SID decoder needs backbone= (its ranker) and codes= (the SIDs)")
        kind, own = "sid", model.state_dict()
        sizes = {"num_levels": model.num_levels, "vocab_size": model.vocab_size}
        if codes.ndim != 2 or codes.shape[1] != model.num_levels:
            raise InputError(f"codes {tuple(codes.shape)} do not match the decoder's {model.num_levels} levels")
    else:
        raise InputError(f"save_retriever: {type(model).__name__} is not a TwoTowerEncoder or SidDecoder")
    if path.exists() and not overwrite:
        raise InputError(f"retriever artifact {path} already exists; remove it, choose another path or pass "
                         "overwrite=True")
    if path.exists():
        _read_meta(path)  # overwrite replaces a retriever artifact only, never another file or directory
    meta = {"format": FORMAT, "kind": kind, "fingerprint": _fingerprint(schema, dataset_dir, codes),
            "backbone_config": OmegaConf.to_container(OmegaConf.structured(backbone.cfg), enum_to_str=True),
            "max_s_tokens": int(max_s_tokens), **sizes,
            "index": asdict(index or IndexConfig()) if kind == "two_tower" else None,
            "item_vectors": "built at load time from the item tables" if kind == "two_tower" else None}
    state = {"backbone": backbone.state_dict(), "model": own}
    if codes is not None:
        state["codes"] = codes.detach().cpu().long()
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_synced(tmp / STATE, lambda f: torch.save(state, f))
        _write_synced(tmp / META, lambda f: f.write(json.dumps(meta, indent=2, default=str).encode()))
        fsync_dir(tmp)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_synced(path: Path, write: Any) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _read_meta(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is a file, not a retriever artifact directory"
        raise InputError(f"retriever {path} {what} (an artifact is a directory holding {META} and {STATE}, "
                         "written by recsys.retrieval.artifact.save_retriever)")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"retriever {path}: {META} is missing or not JSON ({type(e).__name__}: {e}); "
                         "not a retriever artifact") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("kind") not in KINDS:
        raise InputError(f"retriever {path}: {META} is not a {FORMAT} artifact of kind {'/'.join(KINDS)}")
    return meta


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch reports a foreign file as one of many error types
        raise InputError(f"retriever {path}: {STATE} is not a readable torch file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not {"backbone", "model"} <= set(state):
        raise InputError(f"retriever {path}: {STATE} lacks the backbone / model state")
    return state


def _check_fingerprint(path: Path, meta: dict[str, Any], schema: DataSchema, dataset_dir: str | Path | None) -> None:
    built = meta["fingerprint"]
    here = _fingerprint(schema, dataset_dir, None)
    keys = ("num_items", "num_categories", "schema_digest")
    if any(built.get(k) != here[k] for k in keys) or (
            built.get("dataset_dir") and here["dataset_dir"] and built["dataset_dir"] != here["dataset_dir"]):
        raise InputError(f"retriever {path} was built for another schema or catalog: its fingerprint "
                         f"{ {k: built.get(k) for k in (*keys, 'dataset_dir')} } != the served model's "
                         f"{ {k: here[k] for k in (*keys, 'dataset_dir')} }; build (train) the retriever on "
                         "this model's dataset")


@dataclass
class LoadedRetriever:
    """A retriever ready to serve one catalog: ``retrieve(batch, k)`` -> item ids ``[B, k]``."""

    kind: str
    path: Path
    fingerprint: dict[str, Any]
    """What it was built for (``retriever.json``)."""
    backbone: OneTransRanker
    model: nn.Module
    index: ItemIndex | None = None
    """two-tower: faiss index of the catalog's item vectors."""
    trie: SidTrie | None = None
    """sid: trie of the catalog's SIDs."""
    stats: dict[str, int] = field(default_factory=lambda: {"beam_requests": 0, "beam_certified": 0})

    @property
    def identity(self) -> dict[str, Any]:
        """What changes this retriever's output: its files' digests and the fingerprint."""
        return {"path": str(self.path), "kind": self.kind, "fingerprint": self.fingerprint,
                "state_sha256": file_sha256(self.path / STATE), "meta_sha256": file_sha256(self.path / META)}

    @property
    def size(self) -> int:
        """Items it can return (the catalog)."""
        return len(self.index) if self.index is not None else len(self.trie)  # type: ignore[arg-type]

    @torch.no_grad()
    def candidate_scores(self, batch: RequestBatch) -> torch.Tensor:
        """``[sum C_b]`` float32: the two-tower's serving score ``u_b . v_c`` of each of ``batch``'s candidates
        (what ``retrieve`` ranks by, for any item, retrieved or not): a ranker's prior
        (``train.hard_negatives.prior``). A SID retriever has no per-item score of this kind: refused."""
        if self.index is None:
            raise InputError(f"retriever {self.path} ({self.kind}) gives no per-candidate score; a score prior "
                             "needs a two-tower retriever")
        u = self.model.user_vectors(batch)  # [B, O]
        v = self.model.item_vectors(batch.cand["item_id"].values(), batch.cand["category"].values())  # [sum C_b, O]
        return (u[candidate_owner(batch)] * v).sum(-1).float()

    @torch.no_grad()
    def retrieve(self, batch: RequestBatch, k: int, exclude_values: torch.Tensor | None = None,
                 exclude_offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(``item_ids [B, k]`` int64, best first, ``scores [B, k]``); ``-1`` / ``-inf`` where a request gets
        fewer. Exclusion (jagged ``[sum L_b]`` + ``[B+1]``, e.g. the history): two-tower asks faiss for more
        rows and keeps ``k`` (``ItemIndex.search``); sid drops excluded items from its ``k`` beams after
        the search (a request may then get fewer than ``k``)."""
        if self.index is not None:
            u = self.model.user_vectors(batch)  # [B, O]
            scores, ids = self.index.search(u, k, exclude_values, exclude_offsets)
            return ids, scores
        res = sid_beam_search(self.model, user_prefix(self.backbone, batch), self.trie, k)
        self.stats["beam_requests"] += int(res.certified.numel())
        self.stats["beam_certified"] += int(res.certified.sum())
        ids, scores = res.item_ids.cpu(), res.scores.cpu()
        if exclude_values is not None and exclude_values.numel():
            lengths = (exclude_offsets[1:] - exclude_offsets[:-1]).long().cpu()
            drop = ItemIndex._excluded(ids, exclude_values.cpu(), lengths) & (ids >= 0)
            ids, scores = ids.masked_fill(drop, -1), scores.masked_fill(drop, float("-inf"))
        return ids, scores


def load_retriever(path: str | Path, schema: DataSchema, catalog: CatalogLike, device: torch.device | None = None,
                   dataset_dir: str | Path | None = None) -> LoadedRetriever:
    """The artifact at ``path`` ready to retrieve from ``catalog`` for ``schema``'s model (``dataset_dir``:
    the dataset the served model was trained on, when known). Refused (``InputError``): a path that is no
    artifact (missing, a file, garbage), a retriever built for another schema / catalog / dataset (both
    fingerprints named), a sid artifact whose codes do not match their recorded digest or that lacks a SID
    for a catalog item."""
    path, device = Path(path), device or torch.device("cpu")
    meta = _read_meta(path)
    _check_fingerprint(path, meta, schema, dataset_dir)
    state = _read_state(path)
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["backbone_config"]))
    backbone = OneTransRanker(schema, cfg, int(meta["max_s_tokens"]))
    try:
        backbone.load_state_dict(state["backbone"])
        if meta["kind"] == "two_tower":
            model: nn.Module = TwoTowerEncoder(backbone, int(meta["out_dim"]))
            model.load_state_dict({**{f"ranker.{k}": v for k, v in state["backbone"].items()}, **state["model"]})
        else:
            model = SidDecoder(cfg, int(meta["num_levels"]), int(meta["vocab_size"]))
            model.load_state_dict(state["model"])
    except RuntimeError as e:  # shapes / keys of another model
        raise InputError(f"retriever {path}: its state does not fit its recorded config ({e})") from None
    backbone, model = backbone.to(device).eval(), model.to(device).eval()
    items = torch.as_tensor(catalog.items, dtype=torch.int64)
    out = LoadedRetriever(meta["kind"], path, meta["fingerprint"], backbone, model)
    if meta["kind"] == "two_tower":
        cats = torch.as_tensor(catalog.cats, dtype=torch.int64)
        with torch.no_grad():
            vecs = model.item_vectors(items.to(device), cats.to(device))  # [M, O]
        out.index = ItemIndex(vecs.cpu(), items, IndexConfig(**meta["index"]))
    else:
        out.trie = _catalog_trie(path, meta, state.get("codes"), items)
    return out


def _catalog_trie(path: Path, meta: dict[str, Any], codes: torch.Tensor | None, items: torch.Tensor) -> SidTrie:
    """The trie of the catalog items' SIDs; every catalog item must have one."""
    if codes is None or codes_digest(codes) != meta["fingerprint"].get("sid_codes_digest"):
        raise InputError(f"retriever {path}: its SID code table is missing or does not match the recorded "
                         "sid_codes_digest (damaged artifact?)")
    inside = items < codes.shape[0]
    has = torch.zeros_like(items, dtype=torch.bool)
    has[inside] = (codes[items[inside]] >= 0).all(1)
    if not bool(has.all()):
        missing = items[~has]
        raise InputError(f"retriever {path}: {missing.numel()} catalog item(s) have no semantic ID in its code table "
                         f"(e.g. {missing[:5].tolist()}); assign SIDs to every served item (recsys.quant) or serve "
                         "a catalog.items_file without them")
    return SidTrie(codes[items], items, vocab_size=int(meta["vocab_size"]))


__all__ = ["LoadedRetriever", "codes_digest", "load_retriever", "save_retriever", "schema_digest"]
