"""``torchrun --nproc_per_node N -m recsys.dist dist=gloo [hydra overrides]``: an alias of ``-m recsys.train``.

Distributed training is ``recsys.train``'s one loop under torchrun (``recsys.dist.strategy`` holds the
distributed pieces); this alias keeps the older command working. It runs the ``recsys.train`` entry point
by name, so the distributed layer does not import the training layer above it.
"""

from __future__ import annotations

import runpy

if __name__ == "__main__":
    runpy.run_module("recsys.train", run_name="__main__", alter_sys=True)
