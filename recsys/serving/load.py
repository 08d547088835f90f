"""Models from checkpoints: the one loader of ``recsys.score``, ``recsys.evaluate`` and ``recsys.compare``.

``load_model`` builds whatever ``recsys.train`` wrote (the OneTrans ranker or a baseline,
``recsys.baselines.build_model``); ``load_ranker`` is the same load restricted to the ranker (the
KV-cached scorer needs its two-stage structure).

Torch and the model stack are imported inside the loaders, not here: ``python -m recsys.score`` resolves
the checkpoint path (``resolve_checkpoint``) before it pays for them, so a wrong path is refused at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import InputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from recsys.data.schema import DataSchema
    from recsys.model.ranker import OneTransRanker

SCORING_KEYS = ("model", "schema", "config", "max_s_tokens")
"""What a checkpoint must hold to be scored or evaluated."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A ``step_<N>.pt`` file as is; a directory -> its newest ``step_<N>.pt`` (or ``checkpoints/``'s).

    The newest by step number, with no fall-back: if that file does not load, scoring fails naming it
    rather than silently scoring an older model.
    """
    p = Path(path)
    if p.is_file():
        return p.resolve()
    dirs = [d for d in (p / "checkpoints", p) if d.is_dir()]
    if dirs:  # only a directory needs the step-file listing (and the torch import of recsys.reliability.checkpoint)
        from recsys.reliability.checkpoint import CheckpointManager
    for d in dirs:
        found = CheckpointManager(d).paths()
        if found:
            return found[-1].resolve()
    raise InputError(f"checkpoint={path}: no such file, and no step_<N>.pt under {p} or {p / 'checkpoints'}")


def load_model(path: Path, device: torch.device, backend: str | None = None, item_content: str | None = None,
               ranker_only: bool = False) -> tuple[nn.Module, DataSchema, dict[str, Any]]:
    """(model in eval mode on ``device``, its data schema, the checkpoint's plain config dict plus
    ``dataset_dir``: the prepared dataset it was trained on, None for checkpoints that do not record it, and
    ``score_prior``: the retriever a residual ranker's logits are trained on top of, or None).

    ``backend``: override of the model's attention backend. ``item_content``: a Parquet (item_id, vector);
    its items without a SID get one from the checkpoint's quantizer (SID rankers only), so items unseen in
    training are scored by their SID. ``ranker_only``: refuse a baseline checkpoint (``recsys.score``).
    """
    from omegaconf import OmegaConf

    from recsys.baselines.factory import build_model
    from recsys.data.schema import DataSchema
    from recsys.model.config import Backend, ModelConfig
    from recsys.model.ranker import OneTransRanker
    from recsys.reliability.checkpoint import load_checkpoint, load_model_state, require_keys

    state = load_checkpoint(path)
    require_keys(state, SCORING_KEYS, path, "be scored")
    schema = DataSchema.from_json(state["schema"])
    config = {**state["config"], "dataset_dir": state.get("dataset_dir"), "score_prior": state.get("score_prior")}
    # Through a structured merge, not ModelConfig(**d): it type-checks every key (config enums have
    # lower-case names equal to their values, which is what checkpoints store). No ``arch``: a ranker.
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), config["model"])
    if ranker_only and model_cfg.arch != "onetrans":
        raise InputError(f"{path} holds a {model_cfg.arch.value!r} baseline; recsys.score serves the OneTrans "
                         "ranker only (evaluate baselines with python -m recsys.evaluate)")
    if backend is not None:
        model_cfg.attention_backend = Backend(backend)
    model = build_model(schema, OmegaConf.to_object(model_cfg), int(state["max_s_tokens"]))
    load_model_state(model, state["model"], str(path))
    if item_content:
        if "item_sid" not in state or not isinstance(model, OneTransRanker):
            raise InputError(f"item_content given but checkpoint {path} has no semantic IDs "
                             "(trained with model.item_embedding.mode=id)")
        from recsys.quant.ranker import add_new_items
        add_new_items(model, state["item_sid"], item_content, schema.num_items)
    return model.to(device).eval(), schema, config


def load_ranker(path: Path, device: torch.device, backend: str | None = None, item_content: str | None = None
                ) -> tuple[OneTransRanker, DataSchema, dict[str, Any]]:
    """:func:`load_model` of a OneTrans ranker checkpoint (a baseline is refused, naming the file)."""
    from recsys.model.ranker import OneTransRanker

    model, schema, config = load_model(path, device, backend, item_content, ranker_only=True)
    assert isinstance(model, OneTransRanker)
    return model, schema, config
