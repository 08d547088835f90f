"""`python -m recsys.quant [hydra overrides]`: item content vectors -> semantic IDs (+ report).

Examples::

    python -m recsys.quant                                        # synthetic content, RQ-KMeans
    python -m recsys.quant method=rq_vae data=ml100k content.source=side_features
    python -m recsys.quant method=multi_expert content.source=parquet content.path=vecs.parquet

The last line printed is the path of ``sids.pt``; train with it via
``python -m recsys.train model.item_embedding.mode=sid model.item_embedding.sid_path=<that path>``.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from recsys.quant.config import QuantConfig, register_configs
from recsys.reliability.entry import exit_on_input_error

register_configs()


@hydra.main(config_path="../configs", config_name="quant", version_base="1.3")
@exit_on_input_error
def main(dcfg: DictConfig) -> None:
    cfg: QuantConfig = OmegaConf.to_object(dcfg)  # runs every __post_init__ validation
    from recsys.quant.run import quantize

    print(quantize(cfg))


if __name__ == "__main__":
    main()
