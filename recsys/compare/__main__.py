"""`python -m recsys.compare [data=ml100k] [overrides]`: train the ranker and the baselines, one table.

Writes ``table.md``, ``table.json``, ``runs.json`` and ``bars.png`` under ``output_dir``; prints
the table and its path last.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from recsys.compare.config import CompareConfig, register_configs
from recsys.reliability.entry import exit_on_input_error

register_configs()


@hydra.main(config_path="../configs", config_name="compare", version_base="1.3")
@exit_on_input_error
def main(dcfg: DictConfig) -> None:
    cfg: CompareConfig = OmegaConf.to_object(dcfg)  # runs every __post_init__ validation
    from recsys.compare.run import run_comparison  # heavy imports after config validation

    path = run_comparison(cfg)
    print(path.read_text())
    print(path)


if __name__ == "__main__":
    main()
