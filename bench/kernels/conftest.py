"""Collect ``bench_*.py`` in this folder as pytest modules (pytest's default is ``test_*.py``).

Run: ``.venv/bin/python -m pytest bench/kernels --benchmark-only``.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
