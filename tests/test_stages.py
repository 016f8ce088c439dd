"""The stage runner: stages run in order, each recorded when done; a rerun skips recorded ones,
--from reruns from a stage on, --until stops after one, a failing stage is not recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spatialalign_jax.loop.stages import Stage, StageError, StageRunner


def _runner(tmp_path, calls, fail=None):
    def make(name):
        def run():
            calls.append(name)
            if name == fail:
                raise RuntimeError(f"{name} broke")
            return {"n": len(calls)}
        return Stage(name, run, f"the {name} stage")

    return StageRunner(tmp_path, [make(n) for n in ("a", "b", "c")], log=lambda line: None)


def test_runs_records_and_skips(tmp_path):
    calls = []
    done = _runner(tmp_path, calls).run()
    assert calls == ["a", "b", "c"] and list(done) == ["a", "b", "c"]
    record = json.loads((tmp_path / "stages.json").read_text())["done"]
    assert record["b"]["n"] == 2 and record["b"]["seconds"] >= 0
    _runner(tmp_path, calls).run()
    assert calls == ["a", "b", "c"]  # nothing left to do
    status = _runner(tmp_path, calls).status()
    assert status.count("done") == 3 and "the b stage" in status


def test_until_and_from(tmp_path):
    calls = []
    _runner(tmp_path, calls).run(until="a")
    assert calls == ["a"] and "to do" in _runner(tmp_path, calls).status()
    _runner(tmp_path, calls).run()
    assert calls == ["a", "b", "c"]
    _runner(tmp_path, calls).run(start="b", until="b")  # --from reruns a recorded stage
    assert calls == ["a", "b", "c", "b"]
    with pytest.raises(StageError, match="'x' is not a stage of this loop; its stages are: a, b, c"):
        _runner(tmp_path, calls).run(until="x")
    with pytest.raises(StageError, match="comes after"):
        _runner(tmp_path, calls).run(start="c", until="a")


def test_a_failed_stage_is_not_recorded_and_a_rerun_continues_there(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="b broke"):
        _runner(tmp_path, calls, fail="b").run()
    assert list(json.loads((tmp_path / "stages.json").read_text())["done"]) == ["a"]
    _runner(tmp_path, calls).run()
    assert calls == ["a", "b", "b", "c"]


def test_a_corrupt_record_is_named(tmp_path):
    (tmp_path / "stages.json").write_text("{not json")
    with pytest.raises(StageError, match="is not a stage record"):
        _runner(tmp_path, []).run()


def test_rounds_append_their_stages_and_are_checked(tmp_path, capsys):
    """loop.rounds adds merge@r and round r's stages after round 1's (whose names stay); --rounds is
    checked like every loop flag."""
    from spatialalign_jax.loop import cli
    from spatialalign_jax.loop.cycle import ROUND_STAGES, STAGE_NAMES, build_runner
    from spatialalign_jax.train.run_config import load_run_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    rc = load_run_config(configs / "world.yaml", [f"run.dir={tmp_path}", "loop.rounds=3"])
    names = [s.name for s in build_runner(rc).stages]
    rounds = [f"{s}@{r}" for r in (2, 3) for s in ("merge", *ROUND_STAGES)]
    assert names == list(STAGE_NAMES) + rounds
    assert "round 2's model" in build_runner(rc).status()
    for argv, message in ((["--rounds", "0"], "loop.rounds"),
                          (["--config", str(configs / "tiny.yaml"), "--rounds", "2"], "--rounds is for the loop")):
        with pytest.raises(SystemExit):
            cli.main([*argv, "--set", f"run.dir={tmp_path}"], prog="run_train.py")
        assert message in capsys.readouterr().err
