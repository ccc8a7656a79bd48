"""The driver side of a training run: Ray Train's TorchTrainer, the run directory and its summary.

:func:`run` is what ``python -m glare.train`` (the CLI, :mod:`glare.train`), the sweep's trials
(``tune/sweep.py``) and the study (``experiments/study.py``) call; the helpers read a run
directory's metrics.jsonl and checkpoints back.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glare.config import GlareConfig, to_dict, to_yaml
from glare.ray_start import init_ray


def pretrain_data(cfg: GlareConfig):
    """The unlabelled images the config names (the mosaic's unlabelled split by default) as a
    :class:`glare.data.pretrain.PretrainData`: the Ray Dataset and whether it is materialised."""
    from glare.data.pretrain import open_pretrain_data
    from glare.data.sources import resolve_pretrain_source

    d = cfg.data
    source = resolve_pretrain_source(d.source, d.mosaic)
    return open_pretrain_data(source, d.base_size, d.image_column, materialize=d.materialize)


def ordered_ingest() -> Any:
    """Ray Train's data config with Ray's default ingest options, but blocks kept in order.

    The workers' shards then reach them in the same order on every run, so the seeded shuffle
    (``data.shuffle_buffer``) makes a run repeatable.
    """
    import warnings

    import ray.train

    with warnings.catch_warnings():
        # Ray's own default_ingest_options copies the deprecated `exclude_resources` option and warns
        # about it (Ray 2.5x); nothing the user can act on, so it stays off the console.
        warnings.filterwarnings("ignore", message=".*exclude_resources.*")
        options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options=options)


def worker_resources(cfg: GlareConfig) -> dict[str, float]:
    """What each training worker asks Ray for (one bundle of the run's placement group)."""
    return {"CPU": cfg.ray.cpus_per_worker, **({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {})}


def no_capacity(err: BaseException) -> bool:
    """Whether a failed ``fit`` means the workers' resources never came (Ray Train's startup timeout)."""
    failure = getattr(err, "controller_failure", None)
    return type(failure).__name__ == "WorkerGroupStartupTimeoutError"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a rerun of this run resumes from: the newest one Ray Train has registered (None:
    none). Not simply the newest ``checkpoint_*`` folder: a folder is written before Ray's controller
    registers it, and a node lost or a driver killed in between leaves one Ray will not resume from.
    """
    import logging

    import ray.train

    if not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        return None  # Ray registered no checkpoint (Result.from_path would raise)
    quiet = logging.getLogger("ray.train")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # Ray announces the snapshot it reads at INFO; nothing to act on here
    try:
        checkpoint = ray.train.Result.from_path(run_dir).checkpoint
    except Exception:  # noqa: BLE001 (a snapshot naming a folder since deleted: no checkpoint to resume from)
        return None
    finally:
        quiet.setLevel(level)
    return Path(checkpoint.path) if checkpoint is not None else None


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint folder holds."""
    from glare.engine.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["loop"]["step"])


def _log_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file such as metrics.jsonl (none if it is missing; a line a killed
    writer left torn is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def end_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``"event": "end"`` record of metrics.jsonl, if any (a resumed run drops its predecessor's)."""
    ends = [line for line in _log_lines(run_dir) if '"event": "end"' in line]
    return json.loads(ends[-1]) if ends else None


def probe_records(run_dir: Path, skip: int = 0) -> list[dict[str, Any]]:
    """The ``"probe"`` events (mIoU and per-class IoU of each evaluation) of metrics.jsonl, all of a resumed run."""
    return [json.loads(line) for line in _log_lines(run_dir)[skip:] if '"event": "probe"' in line]


def stopped_summary(run_dir: Path, reason: str) -> dict[str, Any]:
    """``summary.json``'s content for a run stopped from outside (a sweep's scheduler ended its trial's
    actor, a Ctrl-C, no capacity for its workers) before its workers could close it, from its
    metrics.jsonl: no after-value, no export, the reason."""
    steps = [r for r in json_lines(run_dir / "metrics.jsonl") if "event" not in r and "step" in r]
    probes = probe_records(run_dir)
    first = probes[0] if probes and probes[0]["step"] == 0 else {}
    last_ckpt = latest_checkpoint(run_dir)
    keys = ("images_seen", "trainable_params", "backbone_params", "images_per_s", "pretrain_images", "materialized",
            "skipped_images", "skipped_files", "nonfinite_steps", "worker_nodes", "train_s", "train_cpu_s",
            "train_peak_mb")
    return {"run_dir": str(run_dir), "miou_before": first.get("miou"), "miou_after": None,
            "steps": steps[-1]["step"] if steps else None, **dict.fromkeys(keys),
            "probe_classes": (first.get("labelled_images") or {}).get("classes"), "stop_reason": reason,
            "last_good_step": checkpoint_step(last_ckpt) if last_ckpt else None,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "export": None, "wall_s": None,
            "labelled_images": first.get("labelled_images"), "class_names": first.get("class_names"),
            "per_class_iou_before": first.get("per_class_iou"), "per_class_iou_after": None}


def write_run_report(run_dir: Path) -> Path | None:
    """:func:`glare.report.write_report`; a failure is a warning, never the end of the run."""
    from glare.report import write_report

    try:
        return write_report(run_dir)
    except Exception as err:  # the run's results are on disk already; the report can be rebuilt later
        print(f"[glare] warning: the run report failed ({type(err).__name__}: {err}); "
              f"rebuild it with `python -m glare.report {run_dir}`", file=sys.stderr, flush=True)
        return None


def _run_location(cfg: GlareConfig) -> tuple[str, str, Path]:
    """(run name, storage path, run directory): a local storage path made absolute, a URI kept."""
    name = cfg.train.run_name or time.strftime("glare-%Y%m%d-%H%M%S")
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return name, storage, Path(storage) / name


def _trainer(cfg: GlareConfig, name: str, storage: str, run_dir: Path, dataset: Any, callbacks: Sequence[Any]
             ) -> Any:
    """The TorchTrainer of a run: one worker per ``ray.num_workers``, checkpoints and failures as configured."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from glare.engine.loop import train_loop_per_worker

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=cfg.ray.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            # With a capacity limit, the first wait past it ends the run (Ray would retry it forever).
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures,
                                                   controller_failure_limit=0 if cfg.ray.capacity_wait_s else -1),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
        datasets={"train": dataset},
        dataset_config=ordered_ingest(),
    )


def _ended_early_summary(why: str, name: str, run_dir: Path, start: float) -> dict[str, Any]:
    """The summary of a run Ray ended before its workers could close it (``why``), naming what a rerun
    resumes from: workers that never got their resources, or a Ctrl-C."""
    last = latest_checkpoint(run_dir)
    reason = f"{why}; " + (f"the last checkpoint (step {checkpoint_step(last)}, {last}) is intact: rerun with "
                           f"train.run_name={name} to resume" if last else "no checkpoint was written")
    return {**stopped_summary(run_dir, reason), "wall_s": time.time() - start}


def _run_summary(run_dir: Path, result: Any, data: Any, probe_classes: int, start: float) -> dict[str, Any]:
    """``summary.json``'s content of a run that trained: its end record, probes and what the data skipped."""
    from glare.data.pretrain import skipped_images

    metrics = end_record(run_dir) or dict(result.metrics or {})
    skipped = skipped_images()
    probes = probe_records(run_dir)
    first, last = (probes[0], probes[-1]) if probes and probes[0]["step"] == 0 and len(probes) > 1 else ({}, {})
    stopped = metrics.get("stop_reason") or ""
    export = run_dir / "export" / "backbone.safetensors"
    return {
        "run_dir": str(run_dir),
        "miou_before": metrics.get("miou_before"),
        # A stopped run was not evaluated after training and wrote no export.
        "miou_after": None if stopped else metrics.get("miou"),
        "steps": metrics.get("step"),
        "images_seen": metrics.get("images_seen"),
        "trainable_params": metrics.get("trainable_params"),
        "backbone_params": metrics.get("backbone_params"),
        "images_per_s": (metrics.get("images_seen") or 0) / metrics["train_seconds"]
        if metrics.get("train_seconds") else None,
        "pretrain_images": data.num_images,
        "materialized": data.materialized,
        "probe_classes": probe_classes,
        "skipped_images": len(skipped),
        "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
        "nonfinite_steps": metrics.get("nonfinite_steps"),
        "worker_nodes": metrics.get("worker_nodes"),
        "stop_reason": stopped,
        "last_good_step": metrics.get("last_good_step"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": str(export) if not stopped and export.is_file() else None,
        "wall_s": time.time() - start,
        "train_s": metrics.get("train_seconds"),
        "train_cpu_s": metrics.get("train_cpu_seconds"),
        # Peak memory of the training steps (intermediate evaluations included), above the memory before
        # the model was built: resident set on the CPU, allocated bytes on CUDA (rank 0).
        "train_peak_mb": metrics.get("train_peak_mb"),
        "labelled_images": (probes[0] if probes else {}).get("labelled_images"),
        "class_names": first.get("class_names"),
        "per_class_iou_before": first.get("per_class_iou"),
        "per_class_iou_after": last.get("per_class_iou"),
    }


def run(cfg: GlareConfig, callbacks: Sequence[Any] = (), verbose: bool = False, report: bool = True
        ) -> dict[str, Any]:
    """Train with Ray Train's TorchTrainer and write the run directory; returns ``summary.json``'s content.

    ``callbacks`` go to the trainer's RunConfig (a Tune trial passes Ray's
    ``TuneReportCallback`` so every report reaches the sweep). Unless ``verbose``, the
    progress is shown from metrics.jsonl (:mod:`glare.console`); with ``report`` the run
    ends by writing ``report.md`` (:mod:`glare.report`).
    """
    import ray.train

    from glare.console import RunProgress
    from glare.eval.protocol import open_probe_sets

    start = time.time()
    # The labelled set is read by the rank-0 worker; a mistake in it should fail here, in one line, before
    # a run directory or Ray exists.
    probe_train, probe_eval = open_probe_sets(cfg.data, check_labels=True)
    name, storage, run_dir = _run_location(cfg)

    init_ray(cfg, verbose)
    data = pretrain_data(cfg)
    d = cfg.data
    print(f"[glare] data: {data.summary()}; probe set: {d.seg_format}, {probe_eval.num_classes} classes, "
          f"{len(probe_train)} {d.seg_train_split} / {len(probe_eval)} {d.seg_eval_split} images", flush=True)
    # Only now: a start that fails (bad data, no cluster) leaves no run directory behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"[glare] run directory: {run_dir}", flush=True)
    trainer = _trainer(cfg, name, storage, run_dir, data.dataset, callbacks)
    try:
        if verbose:  # the workers' own lines reach the console
            result = trainer.fit()
        else:
            with RunProgress(run_dir / "metrics.jsonl", cfg.train.steps, cfg.train.log_every):
                result = trainer.fit()
    except ray.train.ControllerError as err:
        if not (cfg.ray.capacity_wait_s and no_capacity(err)):
            raise
        summary = _ended_early_summary(f"no capacity for {cfg.ray.num_workers} worker(s) of "
                                       f"{worker_resources(cfg)} within ray.capacity_wait_s="
                                       f"{cfg.ray.capacity_wait_s:g} s", name, run_dir, start)
    except SystemExit:
        # Ray Train's Ctrl-C handler aborts the run, then exits with status 0 from inside fit(): a user would
        # see a silent success. Say instead that the run was interrupted and what a rerun resumes from.
        steps = [r["step"] for r in json_lines(run_dir / "metrics.jsonl") if "loss" in r and "event" not in r]
        summary = _ended_early_summary(f"interrupted (Ctrl-C) after logging step {steps[-1] if steps else 0} of "
                                       f"{cfg.train.steps}", name, run_dir, start)
    else:
        summary = _run_summary(run_dir, result, data, probe_eval.num_classes, start)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["report"] = str(write_run_report(run_dir)) if report else None
    return summary
