"""``python tune/sweep.py [--config FILE] [--sweep FILE] [key=value ...]``: tune GLARE with Ray Tune + Optuna.

Each trial is a whole GLARE training (``glare.engine.driver.run``, a TorchTrainer that
may span several GPUs) whose reports reach Tune through ``TuneReportCallback``.
Optuna (TPE, seeded) proposes the points, starting from the base config's own
values; ASHA stops weak trials at the intermediate linear-probe evaluations.
``key=value`` sets the trials' base config, ``sweep.key=value`` the sweep
(``sweep.num_samples=8``, ``sweep.space.optim.lr.high=0.05``, see ``--help``).

Run it from the repository root, locally (it starts Ray itself) or on a
cluster, unchanged: ``ray job submit --working-dir . -- python tune/sweep.py ...``.
Rerunning the same command resumes an interrupted sweep, with the decisions an uninterrupted one
would make (``tune/resume.py``: ASHA's rungs, unsaved trials, a killed driver's Ray). The sweep directory
(``sweep.storage_path/sweep.name``) ends with ``results.csv``,
``best_config.yaml`` (for ``python -m glare.train --config``), the Optuna
study ``optuna.db`` (``optuna-dashboard sqlite:///…/optuna.db``), ``plots/``
and one ``trial_<id>/`` per trial with its training run in ``train/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python tune/sweep.py` puts tune/, not the repository, on the path
    sys.path.insert(0, str(REPO))

from glare.config import ConfigError, GlareConfig, from_dict, to_dict  # noqa: E402
from glare.config import to_yaml as config_yaml  # noqa: E402
from glare.preflight import check_model, check_storage, preflight  # noqa: E402
from tune.space import (  # noqa: E402
    RUN_NAME,
    TRIAL_PREFIX,
    SweepConfig,
    SweepConfigError,
    apply_point,
    check_sweep,
    first_points,
    load_sweep,
    optuna_space,
    point_error,
    scheduler_bounds,
    sweep_base_config,
    trial_config,
)
from tune.space import to_yaml as sweep_yaml  # noqa: E402


class TrainingStopped(RuntimeError):
    """A trial's training stopped early (e.g. repeated non-finite steps)."""


def trial_dirname(trial: Any) -> str:
    """A trial's folder in the sweep directory (Tune's default name spells out every parameter)."""
    return TRIAL_PREFIX + trial.trial_id


def sweep_dir(sweep: SweepConfig) -> Path:
    """``storage_path/name``, absolute; a Ray job needs an absolute storage path (raises SweepConfigError)."""
    storage = Path(sweep.storage_path).expanduser()
    if not storage.is_absolute() and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A job runs in a temporary copy of its working directory, which Ray deletes after the job.
        raise SweepConfigError(f"sweep key 'storage_path': {sweep.storage_path!r} would lie in this Ray job's "
                               "temporary working directory; give an absolute path (shared storage on a "
                               "multi-node cluster)")
    return storage.resolve() / sweep.name


def train_trial(point: dict[str, Any], base: dict[str, Any], exp_dir: str) -> None:
    """One trial: the base config with ``point`` applied, trained by ``glare.engine.driver.run`` (reports to Tune)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from glare.engine.driver import run
    from tune.searcher import FINISHED

    try:
        cfg = trial_config(from_dict(base), point)
        check_model(cfg)  # a point can break a model rule (regions vs heads): invalid, not an error to retry
    except ConfigError as err:
        # The trial ends without a result (Tune's strict metric check is off for this, see main): Optuna
        # records it as pruned, results.csv as INVALID with this message. Raising instead would retry, per
        # FailureConfig, a point that can only fail again.
        print(f"[sweep] invalid point, trial skipped: {err}", flush=True)
        return
    class TrialReports(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            # The closing report's "done" is Tune's own key for "this trial has ended": Tune would stop
            # the trial's actor on it, before run() returns and writes train/summary.json. It goes on
            # as "finished", which tells the searcher that the value is final (tune/searcher.py).
            renamed = [{(FINISHED if k == "done" else k): v for k, v in m.items()} for m in metrics]
            super().after_report(run_context, renamed, checkpoint)

    trial_id = ray.tune.get_context().get_trial_id()
    cfg.train.storage_path = str(Path(exp_dir) / (TRIAL_PREFIX + trial_id))
    cfg.train.run_name = RUN_NAME
    # A restarted trial finds its run here and resumes from its last checkpoint.
    summary = run(cfg, callbacks=[TrialReports()], report=False)  # the sweep reports its best trial
    if summary["stop_reason"]:
        raise TrainingStopped(summary["stop_reason"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trial_cpus(sweep: SweepConfig, cfg: GlareConfig) -> float:
    """CPUs one trial holds: its actor, its training workers and some kept free for Ray Data's tasks."""
    r = sweep.resources
    return r.trial_cpus + r.data_cpus + cfg.ray.num_workers * cfg.ray.cpus_per_worker


def connect(sweep: SweepConfig, cfg: GlareConfig, verbose: bool = False) -> dict[str, float]:
    """Join the cluster (``ray.address``, a Ray job's own) or start a local one; returns its resources.

    Unless ``verbose``, the trials' output stays in their logs (see :mod:`glare.console`).
    """
    import ray

    from glare.ray_start import init_ray

    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        init_ray(cfg, verbose)  # a job's workers run in its working directory, which holds tune/
    else:
        port = _free_port()
        env = {
            # Trial actors unpickle functions of tune.space.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            # Ray Train's placement-group cleaner asks the state API whether a run's controller lives. With
            # several Ray instances on one machine it cannot tell which is ours, fails, and every trial's
            # workers stay reserved: the next trial waits forever. Naming our dashboard avoids that.
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
        }
        init_ray(cfg, verbose, num_cpus=max(os.cpu_count() or 1, math.ceil(trial_cpus(sweep, cfg))), env_vars=env,
                 dashboard_port=port)
        from tune.resume import record_ray_session

        record_ray_session(sweep_dir(sweep))  # what a rerun ends if this driver is killed
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def max_concurrent_trials(sweep: SweepConfig, cfg: GlareConfig, resources: dict[str, float]) -> int:
    """How many trials fit at once in ``resources`` (``sweep.resources.max_concurrent`` if set)."""
    if sweep.resources.max_concurrent:
        return sweep.resources.max_concurrent
    fit = math.floor(resources.get("CPU", 0.0) / trial_cpus(sweep, cfg) + 1e-9)
    if cfg.ray.use_gpu and resources.get("GPU", 0.0) > 0:
        per_trial = cfg.ray.num_workers * cfg.ray.gpus_per_worker  # fractional for small trials
        fit = min(fit, math.floor(resources["GPU"] / per_trial + 1e-9))
    # An autoscaling cluster may show no GPU yet; Tune then queues trials until nodes join.
    return max(1, fit)


def make_searcher(sweep: SweepConfig, cfg: GlareConfig, db: Path):
    """OptunaSearch over the space, its study kept in SQLite at ``db``, the first points enqueued."""
    import optuna

    from tune.searcher import StepOptunaSearch

    url = f"sqlite:///{db}"
    if db.exists() and sweep.name in optuna.get_all_study_names(url):
        optuna.delete_study(study_name=sweep.name, storage=url)  # left by a run that died before Tune saved state
    points = first_points(sweep, cfg)
    for i, point in enumerate(points):
        if err := point_error(cfg, point):
            print(f"[sweep] note: first point {i} is invalid and will be recorded as such: {err}", flush=True)
    samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
    return StepOptunaSearch(
        space=optuna_space(sweep, cfg), metric=sweep.metric, mode=sweep.mode, points_to_evaluate=points or None,
        sampler=samplers[sweep.sampler](seed=sweep.seed), study_name=sweep.name,
        storage=optuna.storages.RDBStorage(url),
    )


def make_scheduler(sweep: SweepConfig, cfg: GlareConfig):
    """ASHA over the reported ``step``, its rungs rebuilt on a resume (None: run every trial to the end)."""
    from tune.resume import ResumableASHA

    if not sweep.scheduler.enabled:
        return None
    grace, max_t = scheduler_bounds(sweep, cfg)
    # stop_last_trials=False: a trial past the last rung runs to its end instead of being cut at its
    # final report, while glare.train still writes its summary.
    return ResumableASHA(time_attr="step", metric=sweep.metric, mode=sweep.mode, max_t=max_t, grace_period=grace,
                        reduction_factor=sweep.scheduler.reduction_factor, stop_last_trials=False)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, sub in data.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def check_resume(exp_dir: Path, sweep: SweepConfig, cfg: GlareConfig) -> None:
    """Refuse to resume a sweep whose saved settings differ from these (naming the keys that differ)."""
    saved = {name: exp_dir / f"{name}.json" for name in ("sweep", "base_config")}
    if not all(p.exists() for p in saved.values()):
        return
    now = {"sweep": dataclasses.asdict(sweep), "base_config": to_dict(cfg)}
    differ = []
    for name, path in saved.items():
        old, new = _flat(json.loads(path.read_text())), _flat(json.loads(json.dumps(now[name])))
        differ += [f"{name}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if differ:
        raise SweepConfigError(f"the sweep in {exp_dir} was started with other settings ({', '.join(differ[:6])}); "
                               "rerun it with the same ones to resume, or pick another sweep.name")


def save_settings(exp_dir: Path, sweep: SweepConfig, cfg: GlareConfig) -> None:
    """The settings a resumed run is checked against, in JSON (exact) and YAML (to read)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / "sweep.json").write_text(json.dumps(dataclasses.asdict(sweep), indent=1))
    (exp_dir / "base_config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    (exp_dir / "sweep.yaml").write_text(sweep_yaml(sweep))
    (exp_dir / "base_config.yaml").write_text(config_yaml(cfg))


def trial_progress(sweep: SweepConfig, max_t: int):
    """A Tune callback printing one line per finished trial: its metric and the best so far.

    The best is taken among trials that trained all their steps, as :func:`best_row` takes it: a
    trial ASHA stopped early is scored at fewer steps, which is not what its config gives when trained.
    """
    from ray.tune import Callback

    from tune.searcher import FINISHED

    better = (lambda a, b: a > b) if sweep.mode == "max" else (lambda a, b: a < b)

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.done, self.best = 0, None  # best: (value, trial id)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            result = trial.last_result or {}
            value, step = result.get(sweep.metric), result.get("step")
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                print(f"[sweep] trial {trial.trial_id} ({self.done}/{sweep.num_samples}) ended without "
                      f"a {sweep.metric}", flush=True)
                return
            finished = bool(result.get(FINISHED)) or (isinstance(step, int) and step >= max_t)
            if finished and (self.best is None or better(value, self.best[0])):
                self.best = (value, trial.trial_id)
            best = f"{self.best[0]:.4f} (trial {self.best[1]})" if self.best else "none yet"
            print(f"[sweep] trial {trial.trial_id} ({self.done}/{sweep.num_samples}): {sweep.metric}={value:.4f} "
                  f"at step {step}{'' if finished else ' (stopped early)'}; best of those that trained "
                  f"all their steps: {best}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.done += 1
            print(f"error: trial {trial.trial_id} ({self.done}/{sweep.num_samples}) failed; its log: "
                  f"{trial.local_path or trial.path}", file=sys.stderr, flush=True)

    return TrialLines()


def build_tuner(sweep: SweepConfig, cfg: GlareConfig, exp_dir: Path, resources: dict[str, float],
                verbose: bool = False):
    """A new Tuner, or the interrupted one restored from ``exp_dir`` (finished trials are kept, not rerun)."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(train_trial, base=to_dict(cfg), exp_dir=str(exp_dir)),
        {"cpu": sweep.resources.trial_cpus},
    )
    if tune.Tuner.can_restore(exp_dir):
        from tune.resume import forget_unsaved_trials

        print(f"[sweep] resuming {exp_dir}", flush=True)
        if removed := forget_unsaved_trials(exp_dir, sweep.name):
            print(f"[sweep] removed {', '.join(removed)}: started after the last saved state, it runs again",
                  flush=True)
        return tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=False)
    save_settings(exp_dir, sweep, cfg)
    concurrent = max_concurrent_trials(sweep, cfg, resources)
    print(f"[sweep] {sweep.num_samples} trials, {concurrent} at a time, in {exp_dir}", flush=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(sweep, cfg, exp_dir / "optuna.db"), scheduler=make_scheduler(sweep, cfg),
            num_samples=sweep.num_samples, max_concurrent_trials=concurrent, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=str(exp_dir.parent),
            failure_config=tune.FailureConfig(max_failures=sweep.max_failures), verbose=1 if verbose else 0,
            callbacks=[trial_progress(sweep, scheduler_bounds(sweep, cfg)[1])],
        ),
    )


def trial_rows(results: Any, sweep: SweepConfig, cfg: GlareConfig) -> list[dict[str, Any]]:
    """One row per trial: id, status, its point, final and best metric, steps, error."""
    from tune.searcher import FINISHED
    rows = []
    for result in results:
        metrics = result.metrics or {}
        point = {k: v for k, v in (result.config or {}).items() if k in sweep.params()}
        history = result.metrics_dataframe
        values = history[sweep.metric].dropna().tolist() if history is not None and sweep.metric in history else []
        final = metrics.get(sweep.metric)
        step = metrics.get("step")
        error = ""
        if result.error is not None:
            status, error = "ERROR", str(result.error).strip().splitlines()[-1]
        elif final is None:
            error = point_error(cfg, point) or ""
            status = "INVALID" if error else "NO RESULT"
            if not error and "step" in metrics:
                error = f"trained, but reported no {sweep.metric!r}"
        elif metrics.get(FINISHED) or (step is not None and step >= point.get("train.steps", cfg.train.steps)):
            status = "COMPLETED"  # its closing report came (with train.steps searched, at its own last step)
        else:
            status = "STOPPED"
        best = (max if sweep.mode == "max" else min)(values) if values else None
        rows.append({"trial_id": Path(result.path).name.removeprefix(TRIAL_PREFIX), "status": status, **point,
                     f"{sweep.metric}_final": final, f"{sweep.metric}_best": best, "steps": step, "error": error})
    return rows


def best_row(rows: Sequence[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any] | None:
    """The trial with the best final metric among those that completed (any with a result if none did)."""
    key = f"{sweep.metric}_final"
    scored = [r for r in rows if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    pool = [r for r in scored if r["status"] == "COMPLETED"] or scored
    if not pool:
        return None
    return (max if sweep.mode == "max" else min)(pool, key=lambda r: r[key])


def write_plots(db: Path, study_name: str, out: Path) -> list[Path]:
    """Optuna's optimisation history, intermediate values and parameter importances as PNGs (where computable)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{db}")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    plots = {"history": ovm.plot_optimization_history, "intermediate": ovm.plot_intermediate_values,
             "importance": ovm.plot_param_importances}
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
        except (ValueError, RuntimeError) as err:  # e.g. importances need two finished trials
            print(f"[sweep] no {name} plot: {err}", flush=True)
            continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.savefig(out / f"{name}.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def write_outputs(results: Any, sweep: SweepConfig, cfg: GlareConfig, exp_dir: Path) -> dict[str, Any]:
    """results.csv, best_config.yaml, plots/ and summary.json in ``exp_dir``; returns the summary."""
    import pandas as pd

    from glare.engine.driver import stopped_summary

    rows = trial_rows(results, sweep, cfg)
    for row in rows:
        run_dir = exp_dir / (TRIAL_PREFIX + row["trial_id"]) / RUN_NAME
        # A trial ASHA stopped had its actor ended inside training: its run wrote no summary.json.
        if row["status"] == "STOPPED" and run_dir.is_dir() and not (run_dir / "summary.json").exists():
            reason = f"stopped by the sweep's scheduler (ASHA) after step {row['steps']}"
            (run_dir / "summary.json").write_text(json.dumps(stopped_summary(run_dir, reason), indent=2))
    table = pd.DataFrame(rows).astype({"steps": "Int64"})  # stays integer next to trials without steps
    table.to_csv(exp_dir / "results.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        print(table.drop(columns=["error"]).to_string(index=False), flush=True)
    best = best_row(rows, sweep)
    summary: dict[str, Any] = {"exp_dir": str(exp_dir), "trials": len(rows),
                               "status": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}},
                               "best": None, "best_config": None}
    if best is not None:
        point = {k: best[k] for k in sweep.params()}
        (exp_dir / "best_config.yaml").write_text(config_yaml(apply_point(cfg, point)))
        summary.update(best={"trial_id": best["trial_id"], sweep.metric: best[f"{sweep.metric}_final"],
                             "point": point}, best_config=str(exp_dir / "best_config.yaml"))
    summary["plots"] = [str(p) for p in write_plots(exp_dir / "optuna.db", sweep.name, exp_dir / "plots")]
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def describe(sweep: SweepConfig) -> str:
    """The settings as YAML, with one line per searched key (for --help)."""
    text = sweep_yaml(dataclasses.replace(sweep, space={})).replace("space: {}\n", "space:\n")
    for key, r in sweep.params().items():
        span = f"choices {r.choices}" if r.choices is not None else f"[{r.low}, {r.high}]"
        text += f"  {key}: {span}{' log' if r.log else ''}{f' step {r.step}' if r.step else ''}\n"
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tune/sweep.py",
        description="Tune GLARE's hyper-parameters with Ray Tune (Optuna TPE + ASHA); each trial is a training run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sweep settings (sweep.key=value; defaults before any preset):\n" + describe(SweepConfig()),
    )
    parser.add_argument("--config", help="the trials' base GlareConfig preset (default: the sweep's base_config)")
    parser.add_argument("--sweep", default="default",
                        help="sweep preset: a path or a name in configs/sweeps/ (default: default; tiny: smoke run)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's and Tune's full output (the trials' lines, Tune's status tables)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="base-config overrides (train.steps=100) and sweep settings (sweep.num_samples=8)")
    return parser.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[SweepConfig, GlareConfig]:
    """The sweep settings and the checked base config from the command line (raises ConfigError)."""
    sweep_ovr = [o.removeprefix("sweep.") for o in args.overrides if o.startswith("sweep.")]
    sweep = load_sweep(args.sweep, sweep_ovr)
    cfg = sweep_base_config(sweep, args.config, [o for o in args.overrides if not o.startswith("sweep.")])
    check_sweep(sweep, cfg)
    return sweep, cfg


def main(argv: list[str] | None = None) -> int:
    from glare.eval.protocol import open_probe_sets

    args = parse_args(argv)
    try:
        sweep, cfg = load(args)
        exp_dir = sweep_dir(sweep)
        check_resume(exp_dir, sweep, cfg)
        open_probe_sets(cfg.data, check_labels=True)  # a bad labelled set fails once, here, not in every trial
        # The base config's model, weights and data, before Ray starts (each trial's run dir is its own).
        check_storage(sweep.storage_path, "sweep.storage_path")
        preflight(cfg, storage=False)
    except (ValueError, OSError) as err:  # ConfigError, WeightsError, DataError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    # An invalid point's trial ends with no result at all, which Tune's strict check would turn into a
    # crash of the whole sweep. A metric that no trial reports shows instead as "NO RESULT" rows.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not args.verbose:
        # Tune's new console output prints its experiment box and paths even at verbose=0; the
        # classic reporter prints nothing then, and the sweep's own one line per trial remains.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from tune.resume import end_dead_session

    try:
        ended = end_dead_session(exp_dir)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if ended:
        print(f"[sweep] ended {len(ended)} leftover processes of the Ray instance a killed run of this sweep "
              "had started", flush=True)
    resources = connect(sweep, cfg, args.verbose)
    results = build_tuner(sweep, cfg, exp_dir, resources, args.verbose).fit()
    summary = write_outputs(results, sweep, cfg, exp_dir)
    print(f"[sweep] trials: {summary['status']}; results: {exp_dir / 'results.csv'}", flush=True)
    if summary["best"] is None:
        print("error: no trial reported a finite " + sweep.metric, file=sys.stderr)
        return 1
    print(f"[sweep] best: trial {summary['best']['trial_id']} {sweep.metric}={summary['best'][sweep.metric]:.4f}; "
          f"reproduce with: python -m glare.train --config {summary['best_config']}", flush=True)
    from glare.engine.driver import write_run_report

    best_run = exp_dir / (TRIAL_PREFIX + summary["best"]["trial_id"]) / RUN_NAME
    if best_run.is_dir() and (report := write_run_report(best_run)):
        print(f"[sweep] best trial's report: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
