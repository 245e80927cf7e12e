"""Probe: hostile inputs against what embq serves, every outcome classified.

    python scripts/probe_robustness.py --quick        # after `make demo`; a few minutes
    python scripts/probe_robustness.py --quick --seed 3 --artifact other.embq

Kinds of tries (seeded, bounded; everything that could crash runs in a child process, which is
restarted after a crash, with a time limit per try):

- model inputs: malformed offsets, ids, dtypes and dense values (and valid variants) into the
  eager core on each kernel choice, the module `embq export` writes (torch.jit.load), the
  eager model with a KeyedJaggedTensor and the Predictor;
- artifact edits on a copy: byte flips, truncations and appended bytes in every file; JSON
  edits of the manifest, unsealed and (for edits that leave it inconsistent) sealed with a
  recomputed digest; then loaded by the Predictor and asked for a fixed batch;
- HTTP on loopback: `embq-serve` on the artifact, malformed requests, wrong methods and media
  types, valid requests in other encodings, stalled request heads and bodies (with /healthz
  timed while they stall), clients that disconnect mid-body;
- malformed data files: `embq data prepare` on binary, compressed, truncated and ill-formed
  Criteo files.

Outcomes: clean_refusal (an EmbqError, a 4xx with a message, a reported refused line),
identical_answer (a valid variant answered as a float64 reference / the canonical request says),
silent_wrong (an answer to invalid input, or a wrong one), crash (killed by a signal, or no
answer in time), traceback (any other exception, a 5xx, a Python traceback in a log),
out_of_bounds_read (an answer to offsets outside the ids, or a refusal quoting numbers the
input does not hold), starved (the server did not answer /healthz within 1.5 s, or kept a
stalled connection past its deadline). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "serving")]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from probe_cases import (  # noqa: E402
    OUTCOMES,
    artifact_edits,
    data_cases,
    float64_logits,
    model_cases,
    reference_batch,
)

DEMO_ARTIFACT = REPO / "runs" / "demo" / "model.embq"


# --------------------------------------------------------------------------- child processes


def _pump(stream: Any, lines: queue.Queue) -> None:
    """Every line of `stream` into `lines`, then None."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_in_children(kind: str, tries: list[dict], context: dict, per_try: float,
                    start_allowance: float = 120.0) -> list[dict]:  # fmt: skip
    """Run `tries` in a child process (`--worker kind`), one JSON result line each; a child that
    dies or stalls is recorded against the try it was on (crash) and replaced for the rest."""
    results: list[dict] = []
    pending = list(tries)
    while pending:
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", kind], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
        proc.stdin.write(json.dumps({"context": context, "tries": pending}))
        proc.stdin.close()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        allowance = start_allowance
        while pending:
            try:
                line = lines.get(timeout=per_try + allowance)
            except queue.Empty:
                proc.kill()
                proc.wait()
                results.append({**pending.pop(0), "outcome": "crash",
                                "detail": f"no answer within {per_try + allowance:g} s"})  # fmt: skip
                break
            allowance = 0.0
            if line is None:  # the child ended before answering the try it was on
                code = proc.wait()
                log.seek(0)
                tail = log.read()[-600:].strip().replace("\n", " | ")
                outcome = "crash" if code < 0 else "traceback"
                results.append({**pending.pop(0), "outcome": outcome,
                                "detail": f"child exited with {code}: {tail}"})  # fmt: skip
                break
            if not line.startswith("{"):
                continue
            result = json.loads(line)
            results.append({**pending.pop(0), **result})
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return results


def worker(kind: str) -> None:
    """Child side: read {"context", "tries"} on stdin, print one JSON line per try."""
    spec = json.loads(sys.stdin.read())
    if kind == "model":
        from probe_cases import ModelRunner as Runner
    elif kind == "artifact":
        from probe_cases import ArtifactRunner as Runner
    else:
        from probe_cases import DataRunner as Runner
    runner = Runner(spec["context"])
    for case in spec["tries"]:
        print(json.dumps(runner.run(case)), flush=True)


# --------------------------------------------------------------------------- HTTP


def http_tries(artifact: Path, workdir: Path, seed: int, quick: bool,
               server_args: list[str]) -> tuple[list[dict], bool]:  # fmt: skip
    """Start embq-serve on `artifact`, run the HTTP tries against it, stop it. Returns
    (results, server_starved)."""
    import socket

    import httpx
    import numpy as np
    from probe_http import http_cases, stall_tries

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "embq_serving.http", str(artifact), "--port", str(port),
         "--log-level", "info", "--max-batch", "64", "--max-body-bytes", str(1 << 20),
         *server_args],
        stdout=log, stderr=log, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path[:3])},
    )  # fmt: skip
    results: list[dict] = []
    starved = False
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise SystemExit(f"embq-serve did not start: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        meta = httpx.get(url + "/metadata", timeout=10).json()
        rng = np.random.default_rng(seed)
        dense, sparse = reference_batch(meta, 4, seed)
        expected = 1 / (1 + np.exp(-float64_logits(artifact, dense, sparse)))
        for case in http_cases(meta, rng, dense, sparse, quick):
            results.append(case.run(url, port, expected))
        stall = stall_tries(url, port, 70, 30)
        results += stall["results"]
        starved = stall["starved"]
        if server.poll() is not None:
            results.append({"category": "http", "name": "server alive after the tries",
                            "outcome": "crash", "detail": f"exit {server.returncode}"})  # fmt: skip
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=40)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()
    text = log_path.read_text(errors="replace")
    tracebacks = text.count("Traceback (most recent call last)")
    if tracebacks:
        results.append({"category": "http", "name": "server log", "outcome": "traceback",
                        "detail": f"{tracebacks} tracebacks in the server log"})  # fmt: skip
    if server.returncode is not None and server.returncode < 0:
        results.append({"category": "http", "name": "server exit", "outcome": "crash",
                        "detail": f"killed by signal {-server.returncode}"})  # fmt: skip
    disconnects = sum("disconnected before sending the whole request body" in line
                      for line in text.splitlines())  # fmt: skip
    expected_lines = sum(1 for r in results if r["name"].startswith("disconnect mid-body"))
    if disconnects != expected_lines:
        results.append({"category": "http", "name": "disconnect log lines", "outcome": "traceback",
                        "detail": f"{disconnects} one-line reports for {expected_lines} "
                                  "disconnects"})  # fmt: skip
    return results, starved


# --------------------------------------------------------------------------- driver


def find_artifact(path: str | None, workdir: Path) -> Path:
    """The artifact to probe: --artifact, runs/demo/model.embq, or a small one built here."""
    if path:
        return Path(path)
    if DEMO_ARTIFACT.exists():
        return DEMO_ARTIFACT
    print("runs/demo/model.embq not found (run `make demo`); building a small model", flush=True)
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/scripts']; "
            "from probe_cases import build_small_artifact; build_small_artifact(sys.argv[2])")  # fmt: skip
    out = workdir / "small.embq"
    subprocess.run([sys.executable, "-c", code, str(REPO), str(out)], check=True)
    return out


def summarise(results: list[dict]) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for r in results:
        row = table.setdefault(r["category"], dict.fromkeys(OUTCOMES, 0))
        row[r["outcome"]] += 1
    return table


def print_table(table: dict[str, dict[str, int]], results: list[dict], seconds: float) -> None:
    header = f"{'category':<16}{'tries':>7}" + "".join(f"{o:>20}" for o in OUTCOMES)
    print(header)
    for category, row in table.items():
        print(f"{category:<16}{sum(row.values()):>7}" + "".join(f"{row[o]:>20}" for o in OUTCOMES))
    totals = {o: sum(row[o] for row in table.values()) for o in OUTCOMES}
    print(f"{'all':<16}{sum(totals.values()):>7}" + "".join(f"{totals[o]:>20}" for o in OUTCOMES))
    bad = [r for r in results if r["outcome"] not in ("clean_refusal", "identical_answer")]
    if bad:
        print("\nnot clean:")
        for r in bad:
            print(f"  [{r['category']}] {r['name']}: {r['outcome']}: {str(r.get('detail'))[:300]}")
    print(f"\n{len(results)} tries in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the bounded set (>= 300 tries)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--artifact", help="artifact to probe (default runs/demo/model.embq)")
    parser.add_argument("--only", choices=["model", "artifact", "http", "data"], action="append",
                        help="run only these kinds (repeatable)")
    parser.add_argument("--server-args", default="--head-timeout 2 --body-timeout 2",
                        help="more embq-serve flags (default: 2 s head and body deadlines)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    start = time.monotonic()
    kinds = args.only or ["model", "artifact", "http", "data"]
    results: list[dict] = []
    starved = False
    with tempfile.TemporaryDirectory(prefix="embq-probe-") as tmp:
        workdir = Path(tmp)
        artifact = find_artifact(args.artifact, workdir)
        pristine = Path(shutil.copytree(artifact, workdir / "pristine.embq"))
        context = {"artifact": str(pristine), "workdir": str(workdir), "seed": args.seed}
        if "model" in kinds:
            print("model inputs ...", flush=True)
            results += run_in_children("model", model_cases(args.seed, args.quick), context, 30)
        if "artifact" in kinds:
            print("artifact edits ...", flush=True)
            edits = artifact_edits(pristine, workdir / "edits", args.seed, args.quick)
            results += run_in_children("artifact", edits, context, 60)
        if "http" in kinds:
            print("HTTP on loopback ...", flush=True)
            more, starved = http_tries(pristine, workdir, args.seed, args.quick,
                                       args.server_args.split())
            results += more
        if "data" in kinds:
            print("malformed data files ...", flush=True)
            cases = data_cases(workdir / "data", args.seed)
            results += run_in_children("data", cases, context, 120)
    seconds = time.monotonic() - start
    table = summarise(results)
    print_table(table, results, seconds)
    count = {o: sum(1 for r in results if r["outcome"] == o) for o in OUTCOMES}
    print(json.dumps({
        "tries": len(results), "clean_refusals": count["clean_refusal"],
        "identical_answers": count["identical_answer"], "silent_wrong": count["silent_wrong"],
        "crashes": count["crash"], "tracebacks": count["traceback"],
        "out_of_bounds_reads": count["out_of_bounds_read"],
        "server_starved": bool(starved or count["starved"]),
        "seconds": round(seconds, 1), "seed": args.seed, "quick": args.quick,
        "by_category": table,
        "not_clean": sorted({f"{r['category']}: {r['name']}" for r in results
                             if r["outcome"] not in ("clean_refusal", "identical_answer")}),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
