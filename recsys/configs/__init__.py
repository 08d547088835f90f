"""The Hydra config tree of every entry point (``train.yaml``, ``score.yaml``, ... and the groups
``data/``, ``model/``, ``train/``, ``dist/``).

It lives inside the package so an installed wheel carries it: the ``@hydra.main`` decorators name it
as ``config_path="../configs"``, which Hydra resolves beside the running ``__main__.py`` under
``python -m recsys.<stage>`` and as ``pkg://recsys/configs`` under a console script (that lookup needs
this ``__init__.py``). The repository's top-level ``configs`` is a symlink to this folder.
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
