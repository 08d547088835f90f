"""Trimming a run's JSON-lines log back to the checkpoint a resume starts from."""

from __future__ import annotations

import json
import os
from pathlib import Path


def trim_log(path: Path, step: int) -> int:
    """Drop records with ``"step" > step`` (written after the checkpoint by a run that then died).

    Without this a resumed run would log those steps twice. A torn last line (killed mid-write)
    is dropped too. Rewritten atomically (temp + rename). Returns the number of lines dropped.
    """
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(rec, dict) and rec.get("step", 0) > step:
            dropped += 1
            continue
        keep.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, path)
    return dropped
