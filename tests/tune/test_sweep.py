"""tune/: sweep presets and their checks (fast), and real sweeps of the tiny model (slow: Tune + TorchTrainer).

The slow tests run ``tune/sweep.py`` as a user would, in subprocesses, each Ray
instance under its own ``RAY_TMPDIR``; afterwards every process that still
carries that variable (the driver's Ray, a ``ray start`` head) is killed by id,
so other Ray instances on the machine are left alone (``ray stop`` would not).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # tune/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from glare.config import ConfigError, load_config, to_dict, to_yaml  # noqa: E402
from tune.space import (  # noqa: E402
    ParamRange,
    SweepConfigError,
    apply_point,
    base_point,
    check_sweep,
    first_points,
    load_sweep,
    optuna_space,
    point_error,
    scheduler_bounds,
    sweep_base_config,
    trial_config,
)
from tune.sweep import check_resume, load, main, max_concurrent_trials, parse_args, save_settings, sweep_dir  # noqa: E402

SWEEP = REPO / "tune" / "sweep.py"


def checked(sweep_overrides: list[str], base_overrides: tuple[str, ...] | list[str] = (), preset: str = "tiny") -> None:
    sweep = load_sweep(preset, sweep_overrides)
    check_sweep(sweep, sweep_base_config(sweep, None, base_overrides))


def test_tiny_preset_with_overrides():
    sweep = load_sweep("tiny", ["num_samples=5", "space.optim.lr.high=0.3", "space.loss.glob=null",
                                "space.region.correspondence.choices=[cross_attention,geometric]"])
    assert (sweep.num_samples, sweep.base_config, sweep.scheduler.grace_period) == (5, "tiny", 2)
    assert sweep.space["optim.lr"] == ParamRange(0.01, 0.3, log=True)  # low: preset, high: override, log: default
    assert "loss.glob" not in sweep.params() and sweep.params()["loss.reg"] == ParamRange(0.0, 2.0)

    cfg = sweep_base_config(sweep, None, ["train.steps=8"])
    assert (cfg.train.steps, cfg.train.eval_every, cfg.model.timm_kwargs["num_heads"]) == (8, 2, 3)
    check_sweep(sweep, cfg)
    space = optuna_space(sweep, cfg)
    assert (type(space["region.num_regions"]).__name__, space["region.num_regions"].high) == ("IntDistribution", 3)
    assert space["optim.lr"].log is True and space["augment.blur_sigma.1"].low == 1.5
    assert space["region.correspondence"].choices == ("cross_attention", "geometric")
    first = base_point(sweep, cfg)
    assert first["optim.lr"] == 0.05 and first["augment.blur_sigma.1"] == 3.0 and first["region.num_regions"] == 2


@pytest.mark.parametrize("sweep_overrides, base_overrides, message", [
    (["num_samplez=3"], [], "sweep key 'num_samplez'"),
    (["num_samples=many"], [], "sweep key 'num_samples'"),
    (["mode=best"], [], "'max' or 'min'"),
    (["storage_path=s3://bucket/sweeps"], [], "shared-filesystem path"),
    (["space.optim.lr.low=0.5"], [], "needs low < high"),
    (["space.optim.lr.log=true", "space.optim.lr.low=0"], [], "log range needs low > 0"),
    (["space.optim.lr.lo=0.1"], [], "space.optim.lr.lo"),
    (["space.loss.gloob.low=0", "space.loss.gloob.high=1"], [], "'loss.gloob' is not a config key"),
    (["space.region.num_regions.high=2.5"], [], "high must be an integer"),
    (["space.region.correspondence.low=0", "space.region.correspondence.high=1"], [], "needs choices"),
    (["space.region.num_regions.high=4"], [], "4 regions need as many attention heads, but vit_tiny_patch16_224 has 3"),
    (["space.optim.lr.low=0.06"], [], "base config's value 0.05 lies outside the range"),
    (["points=[{optim.lr: 0.5}]"], [], "'points[0]': optim.lr=0.5 lies outside its range"),
    (["points=[{}, {optim.lrr: 0.1}]"], [], "'points[1]': 'optim.lrr' is not a searched key"),
    (["scheduler.grace_period=3"], [], "multiple of train.eval_every (2)"),
    ([], ["train.eval_every=0"], "ASHA needs evaluations during training"),
    (["space.train.steps.low=2", "space.train.steps.high=8", "space.train.steps.step=2"], [],
     "trials of up to 8 steps need scheduler.max_t >= 8 (it is 6)"),
    ([], ["region.num_regions=5"], "the base config is not valid"),
])
def test_bad_sweep_settings_are_named(sweep_overrides, base_overrides, message):
    with pytest.raises(SweepConfigError) as err:
        checked(sweep_overrides, base_overrides)
    assert message in str(err.value)


def test_first_points_are_the_base_then_the_given_ones_completed():
    sweep = load_sweep("tiny", ["points=[{optim.lr: 0.1, region.num_regions: 3}]"])
    cfg = sweep_base_config(sweep)
    base, given = first_points(sweep, cfg)
    assert base == base_point(sweep, cfg) and given == {**base, "optim.lr": 0.1, "region.num_regions": 3}
    assert first_points(load_sweep("tiny", ["evaluate_base_first=false"]), cfg) == []


def test_default_sweep_fits_the_main_job():
    sweep, cfg = load(parse_args([]))  # checked against configs/default.yaml
    assert (cfg.model.arch, sweep.num_samples) == ("vit_small_patch14_dinov2", 20)
    assert scheduler_bounds(sweep, cfg) == (20, 80)
    assert base_point(sweep, cfg)["region.num_regions"] == 6 and cfg.model.timm_kwargs == {}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs" / "sweeps").glob("*.yaml")))
def test_every_shipped_sweep_preset_is_valid(preset):
    sweep, cfg = load(parse_args(["--sweep", preset]))  # load() runs check_sweep
    assert optuna_space(sweep, cfg).keys() == sweep.params().keys()
    assert all(set(p) == set(sweep.params()) for p in first_points(sweep, cfg))


def test_steps_sweep_searches_the_length_and_runs_every_trial_to_its_end():
    sweep, cfg = load(parse_args(["--sweep", "steps"]))
    assert set(sweep.params()) == {"train.steps", "model.adapter.first_block", "optim.lr"}
    assert not sweep.scheduler.enabled
    base, short = first_points(sweep, cfg)
    assert (base["train.steps"], short["train.steps"], short["optim.lr"]) == (80, 20, cfg.optim.lr)
    # A trial longer than ASHA's max_t would be cut short and miscounted as stopped: refused.
    with pytest.raises(SweepConfigError, match=r"scheduler.max_t >= 80 \(it is 40\)"):
        checked(["scheduler.enabled=true", "scheduler.max_t=40"], preset="steps")


def test_bad_preset_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheduler: {grace: 2}\n")
    with pytest.raises(SweepConfigError, match="scheduler.grace"):
        load_sweep(bad)
    with pytest.raises(SweepConfigError, match="sweep preset not found: nope"):
        load_sweep("nope")
    bad.write_text("space: {optim.lr: [1, 2}\n")
    with pytest.raises(SweepConfigError, match="is not valid YAML"):
        load_sweep(bad)
    with pytest.raises(SweepConfigError, match="which an earlier override set to 3"):
        load_sweep(None, ["scheduler=3", "scheduler.max_t=4"])


def test_points_apply_to_a_copy_and_invalid_ones_say_why(tiny_cfg, tmp_path):
    base = tiny_cfg("train.eval_every=2")
    cfg = trial_config(base, {"augment.blur_sigma.1": 4.5, "region.num_regions": 3, "optim.lr": 0.1})
    assert (list(cfg.augment.blur_sigma), cfg.region.num_regions, cfg.optim.lr) == ([1.0, 4.5], 3, 0.1)
    assert (list(base.augment.blur_sigma), base.region.num_regions) == ([1.0, 3.0], 2)
    with pytest.raises(ConfigError, match="4 regions need as many attention heads"):
        trial_config(base, {"region.num_regions": 4})
    # Only the combination is invalid: without the regional term the regions are never sampled.
    assert point_error(base, {"region.num_regions": 4, "loss.reg": 0.0}) is None
    zero = {f"loss.{k}": 0.0 for k in ("glob", "reg", "loc1", "loc2")}
    assert "at least one loss weight must be > 0" in point_error(base, zero)
    assert "needs 0.0 <= low <= high" in point_error(base, {"augment.blur_sigma.0": 3.5})

    # What best_config.yaml holds reloads into the same config.
    path = tmp_path / "best_config.yaml"
    path.write_text(to_yaml(apply_point(base, {"optim.lr": 0.1, "region.top_q": 0.3})))
    assert to_dict(load_config(path)) == to_dict(apply_point(base, {"optim.lr": 0.1, "region.top_q": 0.3}))


def test_concurrency_follows_resources():
    sweep = load_sweep("tiny")
    cfg = sweep_base_config(sweep)  # 1 worker x 0.5 CPU, + 0.5 for the trial, + 1 for Ray Data: 2 CPUs a trial
    assert [max_concurrent_trials(sweep, cfg, {"CPU": c}) for c in (1, 2, 3.9, 4, 8)] == [1, 1, 1, 2, 4]
    gpu = sweep_base_config(sweep, None, ["ray.use_gpu=true", "ray.num_workers=2", "ray.cpus_per_worker=4"])
    assert max_concurrent_trials(sweep, gpu, {"CPU": 64, "GPU": 4}) == 2  # GPUs bound it, one per worker
    assert max_concurrent_trials(sweep, gpu, {"CPU": 64}) == 6  # autoscaling, no GPU node yet: CPUs bound it
    fixed = load_sweep("tiny", ["resources.max_concurrent=3"])
    assert max_concurrent_trials(fixed, cfg, {"CPU": 2}) == 3


def test_sweep_dir_of_a_ray_job_must_be_absolute(monkeypatch, tmp_path):
    assert sweep_dir(load_sweep("tiny", [f"storage_path={tmp_path}"])) == tmp_path / "glare-sweep-tiny"
    monkeypatch.chdir(tmp_path)
    assert sweep_dir(load_sweep("tiny")) == tmp_path / "runs" / "sweeps" / "glare-sweep-tiny"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what a Ray job's driver sees
    with pytest.raises(SweepConfigError, match="temporary working directory; give an absolute path"):
        sweep_dir(load_sweep("tiny"))


def test_resuming_with_other_settings_is_refused(tmp_path):
    sweep = load_sweep("tiny")
    cfg = sweep_base_config(sweep)
    save_settings(tmp_path, sweep, cfg)
    assert load_config(tmp_path / "base_config.yaml") == cfg and load_sweep(tmp_path / "sweep.yaml") == sweep
    check_resume(tmp_path, sweep, cfg)  # the same settings: resumes
    with pytest.raises(SweepConfigError, match=r"other settings \(sweep.num_samples, base_config.train.steps\)"):
        check_resume(tmp_path, load_sweep("tiny", ["num_samples=4"]), sweep_base_config(sweep, None, ["train.steps=8"]))


def test_cli_reports_bad_settings_without_starting_ray(capsys):
    assert main(["--sweep", "tiny", "sweep.space.region.num_regions.high=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sweep key 'space.region.num_regions': 5 is not valid") and "Traceback" not in err
    assert main(["--sweep", "tiny", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Slow: real sweeps.


def _pids_with(marker: bytes) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@contextmanager
def private_ray() -> Iterator[dict[str, str]]:
    """An environment whose Ray lives in its own short temp dir; its processes are killed afterwards."""
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=temp, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
               RAY_DATA_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        yield env
    finally:
        for pid in _pids_with(f"RAY_TMPDIR={temp}".encode()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, alive: subprocess.Popen | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            raise AssertionError(f"the process ended (rc={alive.returncode}) before {what}")
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def terminated_trials(exp: Path) -> list[str]:
    """Trials that Tune's saved experiment state records as finished."""
    states = sorted(exp.glob("experiment_state-*.json"))
    try:
        data = json.loads(states[-1].read_text()) if states else {"trial_data": []}
    except (OSError, json.JSONDecodeError):  # being rewritten
        return []
    trials = [json.loads(t) for t, _ in data["trial_data"]]
    return [t["trial_id"] for t in trials if t["status"] == "TERMINATED"]


def read_rows(exp: Path) -> list[dict[str, str]]:
    with open(exp / "results.csv") as f:
        return list(csv.DictReader(f))


def sweep_command(storage: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(SWEEP), "--sweep", "tiny", f"sweep.storage_path={storage}", *overrides]


@pytest.mark.slow
def test_sweep_records_an_invalid_point_and_finishes(tmp_path):
    """A local sweep of two: the base point trains; the given point asks 5 regions of a 3-head ViT."""
    exp = tmp_path / "glare-sweep-tiny"
    command = sweep_command(tmp_path, "sweep.num_samples=2", "loss.reg=0", "sweep.space.region.num_regions.high=5",
                            "sweep.points=[{loss.reg: 1.0, region.num_regions: 5}]")
    with private_ray() as env:
        run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    assert "[sweep] note: first point 1 is invalid" in out
    base, invalid = read_rows(exp)
    assert (base["status"], int(base["steps"]), base["region.num_regions"]) == ("COMPLETED", 6, "2")
    assert invalid["status"] == "INVALID" and invalid["steps"] == "" and invalid["region.num_regions"] == "5"
    assert "5 regions need as many attention heads, but vit_tiny_patch16_224 has 3" in invalid["error"]
    assert not (exp / f"trial_{invalid['trial_id']}" / "train").exists()  # nothing trained
    study = optuna.load_study(study_name="glare-sweep-tiny", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"]
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["best"]["trial_id"] == base["trial_id"] and summary["status"] == {"COMPLETED": 1, "INVALID": 1}
    assert load_config(exp / "best_config.yaml").loss.reg == 0.0
    # The console: one line per finished trial with the best so far, no trial output, the best trial's report.
    miou = float(base["miou_final"])
    assert f"[sweep] trial {base['trial_id']} (" in out
    assert f"miou={miou:.4f} at step 6; best of those that trained all their steps: {miou:.4f}" in out
    assert "Configuration for experiment" not in out and "View detailed results here" not in out  # Tune's box
    assert f"[sweep] trial {invalid['trial_id']} (" in out and "ended without a miou" in out
    assert "RayTrainWorker" not in out and "Trial status" not in out
    report = exp / f"trial_{base['trial_id']}" / "train" / "report.md"
    assert f"[sweep] best trial's report: {report}" in out and (report.parent / "segmentation.png").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


@contextmanager
def ray_head(env: dict[str, str]) -> Iterator[str]:
    """`ray start --head` on free ports with the venv first on PATH (a job's `python` is the head's); its address."""
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                             "ray-client-server-port")}
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    # --block keeps the head in this child; private_ray kills what it started by id afterwards.
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
         "--disable-usage-stats", "--dashboard-host=127.0.0.1", *(f"--{k}={v}" for k, v in ports.items())],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _responds(f"{address}/api/version"), 120, "the head's dashboard", alive=head)
        yield address
    finally:
        head.terminate()
        head.wait(timeout=60)


@pytest.mark.slow
def test_sweep_as_a_ray_job_resumes_after_its_driver_is_killed(tmp_path):
    """3 tiny trials submitted with `ray job submit`; the driver is SIGKILLed after the first finished; the same
    submission resumes the sweep, runs the other two and writes the outputs."""
    exp = tmp_path / "glare-sweep-tiny"
    entrypoint = ["--", "python", "tune/sweep.py", "--sweep", "tiny", f"sweep.storage_path={tmp_path}"]
    with private_ray() as env, ray_head(env) as address:
        submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--working-dir", "."]
        first = subprocess.run([*submit, "--no-wait", *entrypoint], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=120)
        assert first.returncode == 0, first.stdout + first.stderr
        done = wait_for(lambda: terminated_trials(exp), 300, "a finished trial")
        drivers = [pid for pid in _pids_with(f"RAY_TMPDIR={env['RAY_TMPDIR']}".encode())
                   if b"tune/sweep.py" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert drivers
        for pid in drivers:
            os.kill(pid, signal.SIGKILL)
        finished = exp / f"trial_{done[0]}"
        before = {name: (finished / name).read_bytes() for name in ("result.json", "train/metrics.jsonl")}
        rerun = subprocess.run([*submit, *entrypoint], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=420)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0 and "succeeded" in out, out[-3000:]
    assert f"[sweep] resuming {exp}" in out
    assert len(done) == 1, done

    rows = read_rows(exp)
    assert len(rows) == 3 and len({r["trial_id"] for r in rows}) == 3 and rows[0]["trial_id"] == done[0]
    # A trial the killed driver had started after its last saved state leaves no folder behind.
    assert {p.name for p in exp.glob("trial_*")} == {f"trial_{r['trial_id']}" for r in rows}
    assert {name: (finished / name).read_bytes() for name in before} == before  # not rerun
    for row in rows:
        final, best, steps = float(row["miou_final"]), float(row["miou_best"]), int(row["steps"])
        assert 0.0 < final <= best <= 1.0
        # ASHA's rungs are steps 2 and 4; a trial it lets through trains all 6 steps.
        assert (row["status"], steps) in {("COMPLETED", 6), ("STOPPED", 2), ("STOPPED", 4)}, row

    # The study in SQLite holds the same three trials, the base point first, each with its mIoU curve.
    study = assert_study_matches(exp)
    sweep = load_sweep("tiny")
    base = sweep_base_config(sweep)
    assert study.trials[0].params == base_point(sweep, base)

    # best_config.yaml is the base config with the best completed trial's point, and loads.
    summary = json.loads((exp / "summary.json").read_text())
    best = {r["trial_id"]: r for r in rows}[summary["best"]["trial_id"]]
    completed = [float(r["miou_final"]) for r in rows if r["status"] == "COMPLETED"]
    assert best["status"] == "COMPLETED" and float(best["miou_final"]) == max(completed)
    assert to_dict(load_config(exp / "best_config.yaml")) == to_dict(apply_point(base, summary["best"]["point"]))
    assert {p.name for p in (exp / "plots").iterdir()} == {"history.png", "intermediate.png", "importance.png"}


def decisions(exp: Path) -> tuple[list[tuple[str, str, dict[str, str]]], dict[str, Any]]:
    """Per trial, in the sweep's order: status, last step and point (ids are random); and the best point."""
    keys = load_sweep("tiny").params()
    rows = [(r["status"], r["steps"], {k: r[k] for k in keys}) for r in read_rows(exp)]
    return rows, json.loads((exp / "summary.json").read_text())["best"]["point"]


def assert_study_matches(exp: Path) -> optuna.Study:
    """Optuna's study holds the sweep's trials: a completed one COMPLETE with its final mIoU, one ASHA
    stopped PRUNED (its early value is not a final one, tune/searcher.py); curves keyed by step."""
    rows = read_rows(exp)
    study = optuna.load_study(study_name="glare-sweep-tiny", storage=f"sqlite:///{exp / 'optuna.db'}")
    states = {"COMPLETED": "COMPLETE", "STOPPED": "PRUNED"}
    got = sorted((t.state.name, round(t.value, 9), max(t.intermediate_values)) for t in study.trials)
    want = sorted((states[r["status"]], round(float(r["miou_final"]), 9), int(r["steps"])) for r in rows)
    assert got == want
    assert all(set(t.intermediate_values) <= {2, 4, 6} for t in study.trials)
    return study


def assert_exact_records(exp: Path) -> None:
    """Every trial folder is in results.csv; each training step is logged once; every run has its summary."""
    rows = read_rows(exp)
    assert {p.name for p in exp.glob("trial_*")} == {f"trial_{r['trial_id']}" for r in rows}
    for row in rows:
        train = exp / f"trial_{row['trial_id']}" / "train"
        if row["status"] == "INVALID":
            continue
        records = [json.loads(line) for line in (train / "metrics.jsonl").read_text().splitlines()]
        # (kind, step): a logged step, an evaluation's miou record, its probe event, the closing record.
        logged = [(r.get("event") or ("step" if "loss" in r else "miou"), r.get("step")) for r in records
                  if r.get("event", "step") in ("step", "probe", "end", "head_bootstrap")]
        assert len(logged) == len(set(logged)), (row["trial_id"], logged)
        summary = json.loads((train / "summary.json").read_text())
        # A stopped trial may have trained a step or two more before its actor was ended.
        assert summary["steps"] >= int(row["steps"]) and summary["miou_before"] > 0
        if row["status"] == "STOPPED" and summary["stop_reason"]:  # written by the sweep, from metrics.jsonl
            assert "stopped by the sweep's scheduler (ASHA)" in summary["stop_reason"]
            assert summary["miou_after"] is None and summary["checkpoint"] and summary["export"] is None


@pytest.mark.slow
def test_killed_and_resumed_sweep_makes_the_decisions_of_an_uninterrupted_one(tmp_path):
    """The same seeded 3-trial sweep, once straight through and once with its driver (which started Ray itself)
    SIGKILLed after the first trial ended and rerun: the same ASHA stops, completions and best point."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with private_ray() as env:
        run = subprocess.run(sweep_command(straight), cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
        assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    with private_ray() as env:
        exp = resumed / "glare-sweep-tiny"
        driver = subprocess.Popen(sweep_command(resumed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: terminated_trials(exp), 1200, "a finished trial", alive=driver)
        finally:
            driver.kill()
            driver.wait()
        rerun = subprocess.run(sweep_command(resumed), cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=1500)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0 and "[sweep] resuming" in out, out[-3000:]
    want = decisions(straight / "glare-sweep-tiny")
    assert decisions(exp) == want
    assert any(status == "STOPPED" for status, _, _ in want[0]), want  # ASHA had something to decide
    for sweep in (straight / "glare-sweep-tiny", exp):
        assert_exact_records(sweep)
    assert_study_matches(exp)


def test_a_rerun_ends_only_the_dead_drivers_ray_processes(tmp_path):
    """Processes with a file open in the killed driver's session directory are killed; others are left alone."""
    from tune.resume import SESSION_RECORD, _start_time, end_dead_session

    holders = {}
    for name in ("dead_session", "other_session"):
        (tmp_path / name / "logs").mkdir(parents=True)
        script = f"f = open({str(tmp_path / name / 'logs' / 'agent.log')!r}, 'a'); import time; time.sleep(120)"
        holders[name] = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_for(lambda: all(any(os.readlink(fd).endswith("agent.log") for fd in Path(f"/proc/{p.pid}/fd").iterdir())
                             for p in holders.values()), 30, "the holders' open files")
        record = tmp_path / SESSION_RECORD
        # Its driver still runs (here: this test): nothing is ended, the rerun is refused.
        record.write_text(json.dumps({"session_dir": str(tmp_path / "dead_session"), "driver_pid": os.getpid(),
                                      "driver_start": _start_time(os.getpid())}))
        with pytest.raises(RuntimeError, match=f"another driver \\(pid {os.getpid()}\\) is running this sweep"):
            end_dead_session(tmp_path)
        assert holders["dead_session"].poll() is None
        # Its driver is gone (a pid whose start time no longer matches): the session's processes are ended.
        record.write_text(json.dumps({"session_dir": str(tmp_path / "dead_session"), "driver_pid": os.getpid(),
                                      "driver_start": "0"}))
        assert end_dead_session(tmp_path) == [holders["dead_session"].pid]
        assert holders["dead_session"].wait(timeout=10) == -signal.SIGKILL
        assert holders["other_session"].poll() is None and not record.exists()
        assert end_dead_session(tmp_path) == []  # no record: nothing to do
    finally:
        for p in holders.values():
            p.kill()
            p.wait()


def test_asha_rebuilds_its_rungs_from_the_restored_trials_results(tmp_path):
    """Tune restores no scheduler state: the rungs come back from the trials' result.json files, so a trial
    below the restored rung's cutoff is stopped as in the uninterrupted sweep."""
    from types import SimpleNamespace

    from tune.sweep import make_scheduler

    sweep = load_sweep("tiny")
    scheduler = make_scheduler(sweep, sweep_base_config(sweep))  # rungs at steps 2 and 4
    finished = SimpleNamespace(trial_id="a", path=str(tmp_path / "trial_a"), status="TERMINATED")
    Path(finished.path).mkdir()
    results = [{"step": 2, "miou": 0.5}, {"step": 4, "miou": 0.6}, {"step": 6, "miou": 0.7, "done": True}]
    Path(finished.path, "result.json").write_text("".join(json.dumps(r) + "\n" for r in results) + '{"step": 8')
    scheduler.on_trial_add(None, finished)
    assert [recorded for _, recorded in scheduler._brackets[0]._rungs] == [{"a": 0.6}, {"a": 0.5}]
    class NewTrial:  # no folder yet: Tune's Trial.path raises
        trial_id, status = "b", "PENDING"

        @property
        def path(self) -> str:
            raise RuntimeError("Should not access `trial_driver_staging_path` without setting `trial_dir_name`")

    new = NewTrial()
    scheduler.on_trial_add(None, new)
    assert scheduler.on_trial_result(None, new, {"step": 2, "miou": 0.4}) == "STOP"
    # An unfinished trial without a checkpoint starts afresh: nothing of it is replayed.
    running = SimpleNamespace(trial_id="c", path=str(tmp_path / "trial_c"), status="PENDING")
    Path(running.path).mkdir()
    Path(running.path, "result.json").write_text(json.dumps({"step": 2, "miou": 0.9}) + "\n")
    scheduler.on_trial_add(None, running)
    assert "c" not in scheduler._brackets[0]._rungs[1][1]


def test_a_resume_forgets_the_trials_started_after_the_last_saved_state(tmp_path):
    """The killed driver's unsaved trials leave no folder and no RUNNING Optuna trial; an enqueued point such a
    trial had taken is enqueued again, and the next trial gets the number the lost one had."""
    import pickle

    from tune.resume import forget_unsaved_trials

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.enqueue_trial({"x": 0.5})
    saved = study.ask()  # the base point, a trial Tune's saved state knows
    saved.suggest_float("x", 0.0, 1.0)
    study.tell(saved, 0.7)
    study.enqueue_trial({"x": 0.25})
    lost = study.ask()  # taken after the save by a trial that then died with the driver
    lost.suggest_float("x", 0.0, 1.0)
    (tmp_path / "experiment_state-1.json").write_text(json.dumps({"trial_data": [[json.dumps({"trial_id": "a"}), {}]]}))
    (tmp_path / "searcher-state-1.pkl").write_bytes(pickle.dumps({"_ot_trials": {"a": saved}}))
    for name in ("trial_a", "trial_b"):
        (tmp_path / name / "train").mkdir(parents=True)

    assert forget_unsaved_trials(tmp_path, "s") == ["trial_b"]
    assert [p.name for p in tmp_path.glob("trial_*")] == ["trial_a"]
    study = optuna.load_study(study_name="s", storage=storage)
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "COMPLETE"), (1, "WAITING")]
    again = study.ask()
    assert (again.number, again.suggest_float("x", 0.0, 1.0)) == (1, 0.25)
    assert forget_unsaved_trials(tmp_path, "s") == []  # the asked trial is RUNNING but not Tune's: gone again
    assert [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials] == ["COMPLETE", "WAITING"]
