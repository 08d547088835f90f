"""`python -m recsys.evaluate checkpoint=<run dir> output_dir=<report dir> [overrides]`.

Writes metrics.json, curves.json and the PNGs (see ``recsys.evaluate.run``); prints the
metrics.json path last.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from recsys.evaluate.config import EvaluateConfig, register_configs
from recsys.reliability.entry import exit_on_input_error

register_configs()


@hydra.main(config_path="../configs", config_name="evaluate", version_base="1.3")
@exit_on_input_error
def main(dcfg: DictConfig) -> None:
    cfg: EvaluateConfig = OmegaConf.to_object(dcfg)  # runs every __post_init__ validation
    from recsys.evaluate.run import run_evaluation  # heavy imports after config validation

    print(run_evaluation(cfg))


if __name__ == "__main__":
    main()
