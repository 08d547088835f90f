"""Refuse config keys that no structured config declares, including keys added with ``+key=value``.

Why struct mode does not catch them: Hydra applies an *append* override (``+train.foo=1``) inside
``open_dict``, which lifts the struct flag on purpose, so the key lands in the composed config; then
``OmegaConf.to_object`` builds the dataclass from its declared fields and ``setattr``s every other key
on the instance as a plain attribute. Nothing reads ``cfg.train.foo``: the setting is silently
dropped and the run exits 0. :func:`check_known_keys` walks the composed config and names every key
of a structured node that its dataclass does not declare. ``recsys.reliability.entry.exit_on_input_error`` runs
it before every entry point's body, so all of ``python -m recsys.*`` are strict the same way.
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, ListConfig, OmegaConf

from recsys.errors import InputError


def unknown_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Dotted paths of keys of structured (dataclass-typed) nodes that the dataclass does not declare.

    Nodes typed ``dict`` / ``Any`` accept any key and are not checked; interpolations are not resolved.
    """
    found: list[str] = []
    if isinstance(cfg, ListConfig):
        items = [(f"{prefix}[{i}]", cfg._get_node(i)) for i in range(len(cfg))]
    else:
        obj_type = OmegaConf.get_type(cfg)
        declared = ({f.name for f in dataclasses.fields(obj_type)}
                    if isinstance(obj_type, type) and dataclasses.is_dataclass(obj_type) else None)
        items = []
        for key in cfg.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            if declared is not None and key not in declared:
                found.append(path)
            else:
                items.append((path, cfg._get_node(key)))
    for path, node in items:
        if isinstance(node, (DictConfig, ListConfig)) and not (node._is_none() or node._is_missing()
                                                               or node._is_interpolation()):
            found += unknown_keys(node, path)
    return found


def check_known_keys(cfg: object) -> None:
    """Raise ``InputError`` naming every undeclared key of ``cfg`` (see the module docstring); anything but
    a ``DictConfig`` passes."""
    if not isinstance(cfg, DictConfig):
        return
    bad = unknown_keys(cfg)
    if bad:
        raise InputError(f"unknown config key{'s' if len(bad) > 1 else ''} {', '.join(bad)}: no such setting "
                         "(a '+key=value' override adds a key the config does not declare, which would be "
                         "silently ignored); check the spelling against the config's YAML and dataclasses")
