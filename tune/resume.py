"""What a resumed sweep needs beyond ``Tuner.restore`` to reach an uninterrupted sweep's decisions.

Tune restores its trials and the searcher's state from the last experiment-state save, but
(1) rebuilds the scheduler from ``tuner.pkl``, so ASHA's rungs start empty and a resumed trial
passes rungs that would have stopped it, and (2) knows nothing of what the killed driver did after
that save: a trial it had started leaves its folder and a RUNNING Optuna trial behind, and the
restored searcher asks for that trial again under a new id. (3) A SIGKILLed driver that had started
Ray itself leaves some of that instance's processes running.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import signal
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from glare.engine.driver import checkpoint_step, json_lines, latest_checkpoint
from tune.space import RUN_NAME, TRIAL_PREFIX


def resume_step(trial_dir: Path) -> int:
    """The step a restarted trial's training resumes from: its newest checkpoint Ray registered (-1: it
    starts afresh)."""
    last = latest_checkpoint(trial_dir / RUN_NAME)
    try:
        return checkpoint_step(last) if last is not None else -1
    except Exception:  # an unreadable checkpoint: nothing a restart could train from
        return -1


def recorded_results(trial: Any, time_attr: str) -> list[dict[str, Any]]:
    """The results ``trial`` reported before the sweep stopped, the ones its restart will not report again.

    Tune's ``result.json`` in the sweep directory holds what Tune had processed by its last saved state
    (a restarted trial's holds only what came after its restart); the run's ``metrics.jsonl`` holds
    every evaluation. A trial that was still running restarts from its training run's newest
    checkpoint and reports the steps after it again, so only the results up to that step count.
    """
    try:
        trial_dir = Path(trial.path)
    except RuntimeError:  # a new trial: no folder yet, nothing recorded
        return []
    logged = [r for r in json_lines(trial_dir / RUN_NAME / "metrics.jsonl") if "event" not in r]
    # Sorted by step: a rung takes a trial's first result past its milestone.
    results = sorted(json_lines(trial_dir / "result.json") + logged, key=lambda r: r.get(time_attr, math.inf))
    if trial.status == "TERMINATED":
        return results
    last = resume_step(trial_dir)
    return [r for r in results if r.get(time_attr, math.inf) <= last]


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a resume: a restored trial's recorded results are replayed into its bracket.

    A rung records each trial's metric at its first result past the milestone, whatever order the
    trials come in, so the replay rebuilds the rungs the killed run had (exactly so with one trial at
    a time; concurrent trials reach a rung in a timing-dependent order anyway). A trial the killed run
    had stopped but not yet saved as stopped (a ``done`` result) is stopped at its next result.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stop_from: dict[str, float] = {}  # trial id -> the step the killed run stopped it at

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for result in recorded_results(trial, self._time_attr):
            step, value = result.get(self._time_attr), result.get(self._metric)
            if step is None or value is None:
                continue
            bracket.on_result(trial, step, self._metric_op * value)
            if result.get("done") and trial.status != "TERMINATED":
                self._stop_from.setdefault(trial.trial_id, step)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        # A resumed trial reports the steps after its checkpoint again; their rung records are replayed
        # already (the bracket then says CONTINUE), but a stop the killed run made must hold.
        stop = self._stop_from.get(trial.trial_id)
        if stop is not None and result.get(self._time_attr, -1) >= stop:
            return self.STOP
        return super().on_trial_result(tune_controller, trial, result)


def _newest(exp_dir: Path, pattern: str) -> Path | None:
    found = sorted(exp_dir.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def forget_unsaved_trials(exp_dir: Path, study_name: str) -> list[str]:
    """Remove what trials started after the last experiment-state save left behind; returns their folders' names.

    The restored searcher proposes such a trial again (its sampler's random state is restored with it)
    under a new trial id, so its old folder and its RUNNING Optuna trial would be orphans, and the
    Optuna trial numbers would no longer follow the sweep's order.
    """
    import optuna
    from optuna.storages._rdb.models import TrialModel

    state, searcher = _newest(exp_dir, "experiment_state-*.json"), _newest(exp_dir, "searcher-state-*.pkl")
    if state is None or searcher is None:
        return []
    known = {json.loads(t)["trial_id"] for t, _ in json.loads(state.read_text())["trial_data"]}
    removed = []
    for folder in sorted(exp_dir.glob(TRIAL_PREFIX + "*")):
        if folder.is_dir() and folder.name.removeprefix(TRIAL_PREFIX) not in known:
            shutil.rmtree(folder)
            removed.append(folder.name)
    db = exp_dir / "optuna.db"
    if not db.is_file():
        return removed
    with open(searcher, "rb") as f:
        saved = pickle.load(f)
    asked = {t._trial_id for t in saved.get("_ot_trials", {}).values()}  # the study's ids the searcher knows
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    study = optuna.load_study(study_name=study_name, storage=storage)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial._trial_id in asked:
            continue
        # Optuna has no call to delete a trial; its ORM cascades to the trial's params and values.
        session = storage.scoped_session()
        try:
            session.delete(session.get(TrialModel, trial._trial_id))
            session.commit()
        finally:
            session.close()
        if "fixed_params" in trial.system_attrs:  # an enqueued point that the unsaved trial had taken
            study.enqueue_trial(trial.system_attrs["fixed_params"])
    return removed


SESSION_RECORD = "ray_session.json"  # in the sweep directory: the local Ray instance its driver started


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot), which tells a live driver from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def record_ray_session(exp_dir: Path) -> None:
    """Note the session directory of the Ray instance this driver started, and the driver (Linux only)."""
    import ray._private.worker as worker

    node = getattr(worker, "_global_node", None)
    if node is None or not Path("/proc/self/stat").exists():
        return
    exp_dir.mkdir(parents=True, exist_ok=True)
    record = {"session_dir": node.get_session_dir_path(), "driver_pid": os.getpid(),
              "driver_start": _start_time(os.getpid())}
    (exp_dir / SESSION_RECORD).write_text(json.dumps(record, indent=1))


def session_processes(session_dir: str) -> list[int]:
    """This user's processes holding a file open in ``session_dir`` (each Ray process logs there)."""
    prefix = session_dir.rstrip("/") + "/"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd).startswith(prefix) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:  # another user's process, or one that just ended
            pass
    return found


def end_dead_session(exp_dir: Path) -> list[int]:
    """Kill what is left of the Ray instance a killed driver of this sweep had started; returns the pids.

    Raises RuntimeError if that driver still runs: two drivers of one sweep would undo each other's trials.

    A SIGKILLed driver cannot stop its Ray, and some of Ray's processes (``ray::DashboardAgent``,
    ``ray::RuntimeEnvAgent``, idle workers) outlive it. Only processes with a file open in that
    instance's own session directory are killed, and only once its driver is gone: other Ray
    instances on the machine (another sweep, a ``ray start`` cluster) have their own.
    """
    path = exp_dir / SESSION_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    if record.get("driver_start") and _start_time(record["driver_pid"]) == record["driver_start"]:
        raise RuntimeError(f"another driver (pid {record['driver_pid']}) is running this sweep ({exp_dir}); "
                           "wait for it or stop it before rerunning")
    pids = session_processes(record["session_dir"])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    path.unlink(missing_ok=True)
    return pids
