"""`python -m recsys.score checkpoint=... output_dir=... [hydra overrides]`: score request files, print the
summary path last (rank 0's only under torchrun).

Examples::

    python -m recsys.score checkpoint=runs/train/latest output_dir=runs/score/test      # test split of its dataset
    python -m recsys.score checkpoint=runs/train/x/checkpoints/step_400.pt output_dir=out inputs=[data/req.parquet]
    python -m recsys.score checkpoint=runs/ml100k output_dir=runs/ml100k-catalog mode=catalog batch_size=16
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from recsys.reliability.entry import exit_on_input_error
from recsys.serving.config import ScoreConfig, register_configs

register_configs()


@hydra.main(config_path="../configs", config_name="score", version_base="1.3")
@exit_on_input_error
def main(dcfg: DictConfig) -> None:
    cfg: ScoreConfig = OmegaConf.to_object(dcfg)  # runs every __post_init__ validation
    # Refusals that need no torch, before the scoring stack is imported (seconds of CPU): a checkpoint
    # path holding no step_<N>.pt, an input file that does not exist. The job checks both again.
    from recsys.serving.inputs import expand_files
    from recsys.serving.load import resolve_checkpoint

    resolve_checkpoint(cfg.checkpoint)
    expand_files(cfg.inputs)
    from recsys.serving.job import run_scoring  # heavy imports after config validation

    summary = run_scoring(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns it; one line on stdout, not N interleaved
        print(summary)


if __name__ == "__main__":
    main()
