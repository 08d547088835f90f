"""`python -m recsys.train [hydra overrides]`: train the ranker, print the report path last.

Examples::

    python -m recsys.train                                  # small model, embedded synthetic data
    python -m recsys.train data=ml100k model=small train.epochs=3
    python -m recsys.train model=debug data=tiny train.max_steps=50
    torchrun --nproc_per_node 2 -m recsys.train dist=gloo model=debug data=tiny train.max_steps=20
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from recsys.reliability.entry import exit_on_input_error
from recsys.train.config import RunConfig, register_configs

register_configs()


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
@exit_on_input_error
def main(dcfg: DictConfig) -> None:
    cfg: RunConfig = OmegaConf.to_object(dcfg)  # runs every __post_init__ validation
    from recsys.train.loop import train  # heavy imports after config validation

    report = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: rank 0 prints the report path
        print(report)


if __name__ == "__main__":
    main()
