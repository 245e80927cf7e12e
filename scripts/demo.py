"""embq end to end on synthetic Criteo-format data: generate -> prepare -> train -> evaluate ->
quantize the tables in every format (a quality table) -> write the artifact -> serve it over
HTTP on loopback and score held-out rows -> write the size / quality report (runs/demo/report/).

Everything lands in runs/demo/ (rebuilt on each run). The last line printed is one JSON object
with the figures. Run it with `make demo`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch + faiss OpenMP pools on 2 cores

import embq  # noqa: E402
from embq.data.prepared import PreparedData, ids_to_kjt  # noqa: E402
from embq.data.preprocess import prepare_criteo  # noqa: E402
from embq.data.synth import write_synthetic  # noqa: E402
from embq.models.dlrm import save_model  # noqa: E402
from embq.models.train import TrainSettings, train_dlrm  # noqa: E402
from embq.reports.quality import format_markdown, quality_table  # noqa: E402

QUANT_FORMATS = ["int8", "int4", "int4-greedy", "int4-opt", "cb4-row", "cb4-shared", "pq8x8",
                 "int2", "int2-greedy", "int2-opt"]
ARTIFACT_FORMAT = "int4-greedy"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def score_over_http(artifact: Path, data: PreparedData, rows: int = 16) -> dict:
    """Start `embq-serve` on 127.0.0.1, POST held-out rows to /predict, compare the answer with
    the in-process runtime, then stop the server with SIGINT (a graceful shutdown)."""
    import httpx
    import torch

    from embq.runtime.load import load_inference_model

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "embq-serve"), str(artifact),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("embq-serve did not come up")
            time.sleep(0.5)
        _, (start, _) = data.split(0.1)
        dense = np.array(data.dense[start:start + rows], dtype=np.float32)
        ids = np.array(data.sparse[start:start + rows])
        names = data.sparse_feature_names
        body = {"rows": [{"dense": dense[i].tolist(),
                          "sparse": {f: [int(ids[i, j])] for j, f in enumerate(names)}}
                         for i in range(rows)]}
        answer = httpx.post(f"{url}/predict", json=body, timeout=30)
        answer.raise_for_status()
        over_http = np.asarray(answer.json()["probabilities"])
        print(f"      POST /predict ({rows} rows) -> {np.round(over_http[:4], 4)} ...")
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
    model = load_inference_model(artifact)
    with torch.no_grad():
        local = torch.sigmoid(model(torch.from_numpy(dense), ids_to_kjt(ids, names))).numpy()
    return {"rows": rows, "max_abs_diff": float(np.abs(local - over_http).max())}


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

    print(f"[1/8] generating {args.rows:,} synthetic Criteo-format rows", flush=True)
    raw = write_synthetic(work / "synth.tsv", rows=args.rows, seed=args.seed)

    print("[2/8] preparing arrays (log counts, contiguous ids of values seen twice)", flush=True)
    # Frequency mode: values seen at least twice get their own row, the rest share row 0, so
    # every table row is trained (hash mode would leave most rows of big tables untouched).
    summary = prepare_criteo([raw], work / "prepared", mode="frequency", min_frequency=2,
                             dataset_name="synthetic-criteo")
    print(f"      rows read {summary['rows_read']:,}, refused {summary['rows_refused']}, "
          f"click rate {summary['click_rate']:.3f}")

    print("[3/8] training DLRM (1 epoch, CPU)", flush=True)
    data = PreparedData(work / "prepared")
    model, config, metrics = train_dlrm(data, TrainSettings(epochs=1, seed=args.seed))
    save_model(model, config, work / "model")

    print("[4/8] held-out evaluation", flush=True)
    print(f"      AUC {metrics['auc']:.4f}, log loss {metrics['logloss']:.4f}, NE {metrics['ne']:.4f}")

    print("[5/8] quantizing the embedding tables, one format at a time", flush=True)
    rows = quality_table(work / "model", work / "prepared", QUANT_FORMATS,
                         on_row=lambda r: print(f"      {r['format']:<12} {r['size_ratio']:.3f} of fp32, "
                                                f"log loss {r['logloss_delta_pct']:+.3f}%", flush=True))
    print(format_markdown(rows))
    by_format = {r["format"]: r for r in rows}

    print(f"[6/8] writing the {ARTIFACT_FORMAT} artifact", flush=True)
    embq.save(embq.quantize(model, ARTIFACT_FORMAT), work / "model.embq")

    print("[7/8] serving the artifact on loopback and scoring held-out rows over HTTP", flush=True)
    served = score_over_http(work / "model.embq", data)

    print("[8/8] writing the size / quality report", flush=True)
    report_dir = work / "report"
    embq.report(work / "model", work / "prepared", [work / "model.embq"], output=report_dir,
                uniform=rows, progress=False)  # fmt: skip
    print(f"      {report_dir / 'report.html'} (also report.md, report.json)")

    result = {
        "dataset": data.name,
        "rows": data.rows,
        "auc": round(metrics["auc"], 5),
        "logloss": round(metrics["logloss"], 5),
        "ne": round(metrics["ne"], 5),
        "calibration": round(metrics["calibration"], 4),
        "train_seconds": metrics["train_seconds"],
        "int4_greedy_logloss_delta_pct": round(by_format["int4-greedy"]["logloss_delta_pct"], 4),
        "int4_greedy_size_ratio": round(by_format["int4-greedy"]["size_ratio"], 4),
        "artifact": str(work / "model.embq"),
        "http_rows_scored": served["rows"],
        "http_max_abs_diff_vs_in_process": served["max_abs_diff"],
        "report": str(report_dir / "report.html"),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
