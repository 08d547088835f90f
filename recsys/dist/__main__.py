"""`torchrun --nproc_per_node N -m recsys.dist dist=gloo [hydra overrides]`: distributed training.

Same config tree as `python -m recsys.train` (configs/train.yaml) plus the `dist` group; rank 0
prints the report path last. Examples::

    torchrun --nproc_per_node 2 -m recsys.dist dist=gloo model=debug data=tiny train.max_steps=20
    torchrun --nproc_per_node 2 -m recsys.dist dist=gloo dist.sharding=row_wise
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m recsys.dist dist=nccl output_dir=/shared/runs/x
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
    from recsys.dist.loop import train_distributed  # heavy imports after config validation

    report = train_distributed(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(report)


if __name__ == "__main__":
    main()
