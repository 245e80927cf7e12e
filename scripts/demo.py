"""embq end to end on synthetic Criteo-format data: generate -> prepare -> train -> evaluate.

Everything lands in runs/demo/ (rebuilt on each run). The last line printed is one JSON object
with the figures. Run it with `make demo`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embq.data.prepared import PreparedData  # noqa: E402
from embq.data.preprocess import prepare_criteo  # noqa: E402
from embq.data.synth import write_synthetic  # noqa: E402
from embq.model import save_model  # noqa: E402
from embq.train import TrainSettings, train_dlrm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=500_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/demo")
    args = parser.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)  # the demo's own scratch space
    work.mkdir(parents=True)
    started = time.perf_counter()

    print(f"[1/4] generating {args.rows:,} synthetic Criteo-format rows", flush=True)
    raw = write_synthetic(work / "synth.tsv", rows=args.rows, seed=args.seed)

    print("[2/4] preparing arrays (log counts, hashed ids)", flush=True)
    summary = prepare_criteo([raw], work / "prepared", table_size=100_000, dataset_name="synthetic-criteo")
    print(f"      rows read {summary['rows_read']:,}, refused {summary['rows_refused']}, "
          f"click rate {summary['click_rate']:.3f}")

    print("[3/4] training DLRM (1 epoch, CPU)", flush=True)
    data = PreparedData(work / "prepared")
    model, config, metrics = train_dlrm(data, TrainSettings(epochs=1, seed=args.seed))
    save_model(model, config, work / "model")

    print("[4/4] held-out evaluation", flush=True)
    result = {
        "dataset": data.name,
        "rows": data.rows,
        "auc": round(metrics["auc"], 5),
        "logloss": round(metrics["logloss"], 5),
        "ne": round(metrics["ne"], 5),
        "calibration": round(metrics["calibration"], 4),
        "train_seconds": metrics["train_seconds"],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
