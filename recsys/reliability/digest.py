"""Content digests and JSON encoding shared by every stage (run fingerprints, job fingerprints,
dataset keys, input-file hashes): one implementation, so two stages never disagree on what
"the same input" means."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

# sha256 of files already hashed in this process, by (resolved path, size, mtime_ns): an event log
# is hashed once per process even when several config keys name it.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars (metrics computed with numpy)."""
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def json_digest(payload: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of SHA-256 over ``payload`` as canonical JSON (sorted keys;
    values JSON cannot encode are written with ``str``)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks (computed once per process per file state)."""
    p = Path(path)
    st = p.stat()
    ident = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if ident not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FILE_DIGESTS[ident] = h.hexdigest()
    return _FILE_DIGESTS[ident]
