"""The Criteo batch pipeline: raw files -> prepare -> train -> plan -> quantize -> evaluate ->
report, in one work directory, each stage skipped when complete (`embq.pipeline.stages`).

Every stage is an embq verb (or library call) with the options of one config file, e.g.

    {"prepare": {"mode": "frequency", "min_frequency": 2, "nproc": 4},
     "train": {"epochs": 1, "batch_size": 2048},
     "plan": {"max_bytes": 0.15},
     "report": {"uniform": "int8,int4-opt"}}

Sections and keys not given take DEFAULTS. `prepare.nproc` > 1 runs `embq data prepare` under
torchrun (gloo, ranks split the files; byte-identical output). The plan stage calls `embq plan`
when the planner (`embq.hardware.planner`) is installed, else it is "skipped: no planner" and
writes a uniform plan of `plan.fallback`.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embq.errors import ConfigError
from embq.pipeline.stages import Stage, StageResult, run_stage

DEFAULTS: dict[str, dict[str, Any]] = {
    "prepare": {"mode": "hash", "table_size": 100_000, "min_frequency": 2, "strict": False,
                "nproc": 1},
    "train": {"epochs": 1, "batch_size": 2048, "embedding_dim": 16, "seed": 0,
              "valid_fraction": 0.1},
    "plan": {"hardware": "x86-fbgemm", "max_bytes": 0.15, "quick": True, "fallback": "int4-opt",
             "calib_rows": 50_000, "extra_args": []},
    "quantize": {"seed": 0},
    "evaluate": {"kernel": "auto"},
    "report": {"uniform": "", "resamples": 200, "kernel": "auto"},
}
STAGES = list(DEFAULTS)


def load_config(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """DEFAULTS overlaid with the JSON file at `path`; unknown sections or keys are refused."""
    config = copy.deepcopy(DEFAULTS)
    if path is None:
        return config
    try:
        given = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the pipeline config {path}: {e}") from e
    if not isinstance(given, dict):
        raise ConfigError(f"{path} must hold a JSON object of sections {STAGES}")
    for section, values in given.items():
        if section not in config or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown section {section!r} (or not an object); "
                              f"sections: {', '.join(STAGES)}")
        unknown = sorted(set(values) - set(config[section]))
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown} in {section!r}; known: "
                              f"{sorted(config[section])}")
        config[section].update(values)
    return config


def planner_available() -> bool:
    """Whether `embq plan` (the hardware-aware planner) is installed in this embq."""
    try:
        return importlib.util.find_spec("embq.hardware.planner") is not None
    except ModuleNotFoundError:
        return False


def run_verb(args: list[str]) -> dict[str, Any]:
    """Run `embq ARGS` in this process; its last stdout line (JSON) comes back as a dict. An
    EmbqError from the verb propagates as itself."""
    from embq.cli import build_parser

    parsed = build_parser().parse_args(args)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        parsed.func(parsed)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    try:
        return json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        return {"output": lines[-1]}


def _prepare(raw: list[Path], output: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    args = ["data", "prepare", "--quiet", "--mode", cfg["mode"], "--table-size",
            str(cfg["table_size"]), "--min-frequency", str(cfg["min_frequency"]),
            "--output", str(output), "--input", *map(str, raw)]
    if cfg["strict"]:
        args.append("--strict")
    if int(cfg["nproc"]) <= 1:
        return run_verb(args)
    from embq.data.distributed_check import run_torchrun

    done = run_torchrun(args, nproc=int(cfg["nproc"]), timeout=None)
    if done.returncode != 0:
        raise ConfigError(f"`torchrun -m embq data prepare` failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _plan(model: Path, data: Path, output: Path, cfg: dict[str, Any],
          valid_fraction: float = 0.1) -> dict[str, Any]:
    if not planner_available():
        from embq.plan import Plan

        Plan.parse(cfg["fallback"]).save(output)
        return {"skipped": f"no planner (embq.hardware.planner is not installed): uniform plan "
                           f"{cfg['fallback']}"}
    from embq.data.prepared import PreparedData

    # The planner calibrates on training rows: a small dataset gets all of them.
    (start, stop), _ = PreparedData(data).split(valid_fraction)
    calib = min(int(cfg["calib_rows"]), stop - start)
    args = ["plan", "--quiet", "--model", str(model), "--data", str(data), "--hardware",
            cfg["hardware"], "--max-bytes", str(cfg["max_bytes"]), "--output", str(output),
            "--calib-rows", str(calib),
            *(["--quick"] if cfg["quick"] else []), *map(str, cfg["extra_args"])]
    return run_verb(args)


def evaluate_both(model: Path, data_dir: Path, artifact: Path, output: Path,
                  valid_fraction: float, kernel: str) -> dict[str, Any]:
    """AUC / log loss / NE / calibration of the fp32 model and of the artifact on the same
    held-out rows, written to `output` (JSON)."""
    from embq.api import load
    from embq.data.prepared import PreparedData
    from embq.files import write_json_atomic
    from embq.models.dlrm import load_model
    from embq.models.metrics import click_metrics
    from embq.reports.measure import score

    data = PreparedData(data_dir)
    _, (start, stop) = data.split(valid_fraction)
    fp32_model, _ = load_model(model)
    labels, fp32_probs = score(fp32_model, data, start, stop)
    _, q_probs = score(load(artifact, kernel=kernel), data, start, stop)
    result = {"heldout_rows": [start, stop], "fp32": click_metrics(labels, fp32_probs),
              "quantized": click_metrics(labels, q_probs), "kernel": kernel}
    result["logloss_increase"] = result["quantized"]["logloss"] - result["fp32"]["logloss"]
    write_json_atomic(output, result)
    return {k: result[k] for k in ("fp32", "quantized", "logloss_increase")}


def criteo_stages(raw: list[Path], workdir: Path, config: dict[str, dict[str, Any]]) -> list[Stage]:
    """The six stages over `workdir` (their outputs: prepared/, model/, plan.json, model.embq,
    evaluate.json, report/)."""
    prepared, model = workdir / "prepared", workdir / "model"
    plan, artifact = workdir / "plan.json", workdir / "model.embq"
    tr, qz, ev, rp = config["train"], config["quantize"], config["evaluate"], config["report"]
    plan_params = {**config["plan"], "planner": planner_available()}

    def train() -> dict[str, Any]:
        return run_verb(["train", "--quiet", "--data", str(prepared), "--output", str(model),
                         "--epochs", str(tr["epochs"]), "--batch-size", str(tr["batch_size"]),
                         "--embedding-dim", str(tr["embedding_dim"]), "--seed", str(tr["seed"]),
                         "--valid-fraction", str(tr["valid_fraction"])])  # fmt: skip

    def quantize() -> dict[str, Any]:
        return run_verb(["quantize", "--model", str(model), "--plan", str(plan), "--output",
                         str(artifact), "--seed", str(qz["seed"])])

    def report() -> dict[str, Any]:
        return run_verb(["report", "--quiet", "--model", str(model), "--data", str(prepared),
                         "--artifact", str(artifact), "--uniform", rp["uniform"], "--resamples",
                         str(rp["resamples"]), "--kernel", rp["kernel"], "--output",
                         str(workdir / "report")])  # fmt: skip

    return [
        Stage("prepare", list(raw), prepared, lambda: _prepare(raw, prepared, config["prepare"]),
              config["prepare"]),
        Stage("train", [prepared], model, train, tr),
        Stage("plan", [model, prepared], plan,
              lambda: _plan(model, prepared, plan, config["plan"], tr["valid_fraction"]),
              plan_params),
        Stage("quantize", [model, plan], artifact, quantize, qz),
        Stage("evaluate", [model, prepared, artifact], workdir / "evaluate.json",
              lambda: evaluate_both(model, prepared, artifact, workdir / "evaluate.json",
                                    tr["valid_fraction"], ev["kernel"]),
              {**ev, "valid_fraction": tr["valid_fraction"]}),
        Stage("report", [model, prepared, artifact], workdir / "report", report, rp),
    ]


def run_pipeline(raw: list[str | Path], workdir: str | Path, config_path: str | Path | None = None,
                 log: Callable[[str], None] | None = None) -> list[StageResult]:
    """Run the Criteo pipeline on raw Criteo-format files (Kaggle train.txt, Terabyte day_N.gz,
    or any list) in `workdir`, skipping complete stages. Returns each stage's result."""
    log = log or (lambda m: print(m, file=sys.stderr))
    paths = [Path(p) for p in raw]
    if not paths:
        raise ConfigError("give at least one raw Criteo-format file with --raw")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = load_config(config_path)
    return [run_stage(stage, workdir, log) for stage in criteo_stages(paths, workdir, config)]
