"""Cold-start evaluation of semantic-ID item embeddings (issue 6): id vs sid vs both.

For each mode: quantize the item content once (``recsys.quant``), train the ranker, reload the
checkpoint, predict the test split and report AUC on *cold* and *warm* test candidates, plus the
parameters spent on item embeddings. Cold items:

* synthetic: ``synthetic.cold_item_fraction`` of the catalog, in no event and no train/valid row;
  content = the generator's planted item vectors (``content.source=synthetic``);
* ml-100k: ``ml100k.cold_item_fraction`` of the rated movies, in no history and no train/valid row,
  every rating of them a test row (``recsys/data/ml100k.py``); content = genres + release decade
  (``content.source=side_features``). With ``--cold-fraction 0`` (plain leave-one-out): test items
  that never occur as a training candidate.

    python bench/quant_cold_start.py --data synthetic --model small --epochs 2 --seeds 0,1,2   # ~95 min
    python bench/quant_cold_start.py --data ml100k --model debug --epochs 2 --seeds 0,1,2     # ~50 min
    python bench/quant_cold_start.py --data ml100k --modes sid,both --seeds 0,1,2 --tag rebalance --quant-extra collision_fix=rebalance_last

(times: 2-core machine, two such jobs side by side at OMP_NUM_THREADS=1.)

Writes ``bench/results/quant_cold_start_<data>[_<tag>].json`` (and prints it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS  # noqa: E402
from recsys.data import RequestLoader, prepare_dataset  # noqa: E402
from recsys.data.synthetic import cold_item_mask, make_world  # noqa: E402
from recsys.model.metrics import auc  # noqa: E402
from recsys.quant.config import register_configs as register_quant  # noqa: E402
from recsys.quant.run import quantize  # noqa: E402
from recsys.serving.job import load_ranker, resolve_checkpoint  # noqa: E402
from recsys.train.config import register_configs as register_train  # noqa: E402
from recsys.train.evaluate import predict  # noqa: E402
from recsys.train.loop import train  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_cfg(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return OmegaConf.to_object(compose(name, overrides=overrides))


def cold_items(run, ds) -> np.ndarray:
    """``[num_items]`` bool mask of the cold items (see the module docstring)."""
    if run.data.source.value == "synthetic":
        cfg = run.data.synthetic
        return cold_item_mask(cfg, make_world(cfg, np.random.default_rng(np.random.SeedSequence(cfg.seed).spawn(5)[0])))
    if "cold_items" in ds.summary:
        mask = np.zeros(ds.schema.num_items, dtype=bool)
        mask[ds.summary["cold_items"]] = True
        return mask
    seen = pl.concat([pl.read_parquet(f, columns=["cand_item_id"]) for f in ds.splits["train"]])
    counts = np.bincount(seen["cand_item_id"].explode().to_numpy(), minlength=ds.schema.num_items)
    return counts == 0


def subset_auc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float | None:
    if mask.sum() == 0 or labels[mask].min() == labels[mask].max():
        return None
    return float(auc(scores[mask], labels[mask]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic", choices=["synthetic", "ml100k"])
    ap.add_argument("--model", default="debug")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--modes", default="id,sid,both")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cold-fraction", type=float, default=0.1)
    ap.add_argument("--out", default="runs/quant_eval")
    ap.add_argument("--extra", default="", help="extra train overrides, comma-separated")
    ap.add_argument("--quant-extra", default="", help="extra quant overrides, comma-separated")
    ap.add_argument("--tag", default="", help="suffix of the result file name (keeps variants apart)")
    args = ap.parse_args()
    register_quant()
    register_train()
    out = Path(args.out) / args.data
    data = [f"data={args.data}"]
    if args.data == "synthetic":
        data.append(f"data.synthetic.cold_item_fraction={args.cold_fraction}")
        content = ["content.source=synthetic"]
    else:
        data.append(f"data.ml100k.cold_item_fraction={args.cold_fraction}")
        content = ["content.source=side_features"]
    data += [o for o in args.extra.split(",") if o.startswith("data.")]  # the quantizer sees the same world
    t0 = time.perf_counter()
    sids_path = quantize(compose_cfg("quant", data + content + [f"output_dir={out / 'quant'}", "progress=false"]
                                     + [o for o in args.quant_extra.split(",") if o]))
    quant_report = json.loads((sids_path.parent / "report.json").read_text())
    quant_report.pop("train_history", None)
    result: dict = {"data": args.data, "model": args.model, "epochs": args.epochs, "quant": quant_report,
                    "quant_s": round(time.perf_counter() - t0, 1), "runs": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in args.modes.split(","):
            run_dir = out / f"{mode}_s{seed}"
            overrides = data + [f"model={args.model}", f"train.epochs={args.epochs}", f"train.seed={seed}",
                                f"output_dir={run_dir}", "train.progress=false", "train.resume=false",
                                f"model.item_embedding.mode={mode}"]
            if mode != "id":
                overrides.append(f"model.item_embedding.sid_path={sids_path}")
            overrides += [o for o in args.extra.split(",") if o and not o.startswith("data.")]
            run = compose_cfg("train", overrides)
            t1 = time.perf_counter()
            report = json.loads(train(run).read_text())
            wall = time.perf_counter() - t1
            ds = prepare_dataset(run.data, progress=False)
            model, schema, _ = load_ranker(resolve_checkpoint(run_dir), torch.device("cpu"))
            pred = predict(model, RequestLoader(ds.splits["test"], schema, run.data.loader), torch.device("cpu"))
            cold = cold_items(run, ds)[pred.items]
            scores, labels = pred.logits[:, 0], pred.labels[:, 0]
            rec = {"mode": mode, "seed": seed, "train_wall_s": round(wall, 1), "test_auc": report["test_auc"],
                   "auc_all": subset_auc(scores, labels, np.ones_like(cold)),
                   "auc_cold": subset_auc(scores, labels, cold), "auc_warm": subset_auc(scores, labels, ~cold),
                   "cold_rows": int(cold.sum()), "warm_rows": int((~cold).sum()),
                   "item_embedding_params": model.tokenizer.embeddings.item_table_params(),
                   "params_sparse": report["params_sparse"]}
            if pred.true_prob is not None:
                tp = pred.true_prob[:, 0]
                rec["oracle_auc_cold"] = subset_auc(tp, labels, cold)
                rec["oracle_auc_warm"] = subset_auc(tp, labels, ~cold)
            print(json.dumps(rec), flush=True)
            result["runs"].append(rec)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"quant_cold_start_{args.data}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print(path)


if __name__ == "__main__":
    main()
