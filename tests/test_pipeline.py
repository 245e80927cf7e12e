"""Stage records of the batch pipeline: skip when complete, redo when inputs, parameters or the
output changed (and everything downstream with it), never remove what the pipeline did not write."""

import json

import pytest

from embq.errors import ConfigError
from embq.pipeline import criteo
from embq.pipeline.stages import Stage, record_path, run_stage


def copy_stage(name, src, dst, calls, params=None, fail=False):
    """A stage that writes dst from src (upper-cased), counting its runs."""

    def run():
        calls.append(name)
        if fail:
            raise RuntimeError("killed half-way")
        tmp = dst.with_name("." + dst.name + ".tmp")
        tmp.write_text(src.read_text().upper())
        tmp.rename(dst)
        return {"bytes": dst.stat().st_size}

    return Stage(name, [src], dst, run, params or {})


@pytest.fixture
def chain(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text("abc")
    calls = []

    def stages(params=None, fail_second=False):
        return [copy_stage("one", raw, tmp_path / "one.txt", calls, params),
                copy_stage("two", tmp_path / "one.txt", tmp_path / "two.txt", calls,
                           fail=fail_second)]

    def run(**kw):
        return [run_stage(s, tmp_path, log=lambda m: None).status for s in stages(**kw)]

    return tmp_path, raw, calls, run


def test_second_run_skips_complete_stages(chain):
    workdir, _, calls, run = chain
    assert run() == ["ran", "ran"]
    assert run() == ["skipped", "skipped"]
    assert calls == ["one", "two"] and (workdir / "two.txt").read_text() == "ABC"
    record = json.loads(record_path(workdir, "one").read_text())
    assert record["notes"] == {"bytes": 3} and record["output_path"].endswith("one.txt")


def test_changed_input_redoes_the_stage_and_everything_after(chain):
    workdir, raw, calls, run = chain
    run()
    raw.write_text("xyz!")
    assert run() == ["redone", "redone"]
    assert (workdir / "two.txt").read_text() == "XYZ!" and calls == ["one", "two"] * 2


def test_changed_params_redo_the_stage(chain):
    _, _, calls, run = chain
    run()
    assert run(params={"mode": "frequency"}) == ["redone", "redone"]
    assert run(params={"mode": "frequency"}) == ["skipped", "skipped"]


def test_damaged_output_or_torn_record_is_redone(chain):
    workdir, _, _, run = chain
    run()
    (workdir / "two.txt").write_text("tampered")
    assert run() == ["skipped", "redone"]
    record_path(workdir, "one").write_text('{"stage": "one", ')  # a torn record
    with pytest.raises(ConfigError, match="no record of writing it"):
        run()  # one.txt is there but nothing proves it is ours: left alone
    assert (workdir / "one.txt").read_text() == "ABC"


def test_interrupted_stage_is_resumed_from_there(chain):
    workdir, _, calls, run = chain
    with pytest.raises(RuntimeError, match="killed"):
        run(fail_second=True)
    assert not record_path(workdir, "two").exists() and record_path(workdir, "one").exists()
    assert run() == ["skipped", "ran"] and calls == ["one", "two", "two"]


def test_output_without_a_record_is_never_removed(chain):
    workdir, _, calls, run = chain
    (workdir / "one.txt").write_text("the user's own file")
    with pytest.raises(ConfigError, match="no record of writing it"):
        run()
    assert (workdir / "one.txt").read_text() == "the user's own file" and calls == []


def test_config_is_checked(tmp_path):
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"train": {"epochs": 2}}))
    assert criteo.load_config(path)["train"]["epochs"] == 2
    assert criteo.load_config(path)["prepare"] == criteo.DEFAULTS["prepare"]
    path.write_text(json.dumps({"train": {"epoch": 2}}))
    with pytest.raises(ConfigError, match="unknown keys \\['epoch'\\]"):
        criteo.load_config(path)
    path.write_text(json.dumps({"deploy": {}}))
    with pytest.raises(ConfigError, match="unknown section 'deploy'"):
        criteo.load_config(path)


def test_plan_stage_without_planner_writes_a_uniform_plan(tmp_path, monkeypatch):
    from embq.plan import Plan

    monkeypatch.setattr(criteo, "planner_available", lambda: False)
    notes = criteo._plan(tmp_path / "m", tmp_path / "d", tmp_path / "plan.json",
                         {**criteo.DEFAULTS["plan"], "fallback": "int8"})
    assert notes["skipped"].startswith("no planner")
    assert Plan.load(tmp_path / "plan.json") == Plan.parse("int8")


@pytest.mark.slow
def test_pipeline_end_to_end_then_resumes(tmp_path, monkeypatch):
    from embq.data.synth import SynthConfig, write_synthetic

    raw = write_synthetic(tmp_path / "raw.tsv", rows=6000, seed=2, progress=False,
                          config=SynthConfig(cardinalities=[500, 50, *[20] * 24]))
    config = tmp_path / "pipeline.json"
    config.write_text(json.dumps({"prepare": {"table_size": 600, "nproc": 2},
                                  "train": {"batch_size": 512},
                                  "plan": {"fallback": "int8", "max_bytes": 0.3},
                                  "report": {"resamples": 50}}))
    work = tmp_path / "w"
    first = criteo.run_pipeline([raw], work, config, log=lambda m: None)
    assert [r.status for r in first] == ["ran"] * 6
    evaluated = json.loads((work / "evaluate.json").read_text())
    assert evaluated["fp32"]["rows"] == evaluated["quantized"]["rows"] == 600
    assert abs(evaluated["logloss_increase"]) < 0.01
    assert (work / "report" / "report.html").exists()
    again = criteo.run_pipeline([raw], work, config, log=lambda m: None)
    assert [r.status for r in again] == ["skipped"] * 6
    config.write_text(json.dumps({"prepare": {"table_size": 600, "nproc": 2},
                                  "train": {"batch_size": 512},
                                  "plan": {"fallback": "int8", "max_bytes": 0.3},
                                  "report": {"resamples": 60}}))
    last = criteo.run_pipeline([raw], work, config, log=lambda m: None)
    assert [r.status for r in last] == ["skipped"] * 5 + ["redone"]
