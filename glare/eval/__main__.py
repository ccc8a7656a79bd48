"""``python -m glare.eval {linear,knn,mmseg}``: evaluate a GLARE export (or an initialisation) from the shell.

- ``linear``: the fast linear segmentation probe on the configured labelled set (the tuning objective);
- ``knn``: k-NN and linear classification on global-token features of two image-folder trees;
- ``mmseg``: full mmsegmentation fine-tuning / evaluation, forwarded to ``glare.eval.mmseg.runner``.

``--weights`` takes a GLARE export (``.safetensors``) or anything ``model.weights`` accepts
("imgfocus", "none", "timm", a foreign checkpoint) built with the config's ``model.*``.
User mistakes (missing files, bad config keys) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from glare.config import GlareConfig, load_config

DEFAULT_PRESET = "default"


def _add_common(parser: argparse.ArgumentParser, out: str) -> None:
    """Arguments every model-evaluating subcommand shares."""
    parser.add_argument("--weights", required=True,
                        help="GLARE export (.safetensors) or an init: imgfocus, none, timm, a checkpoint path")
    parser.add_argument("--config", default=DEFAULT_PRESET,
                        help=f"YAML preset (path or name in configs/; 'none': built-in defaults). Default: "
                             f"{DEFAULT_PRESET}")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config dot-overrides, e.g. eval.seed=1")
    parser.add_argument("--out", default=out, help=f"where to write the JSON result (default: ./{out})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m glare.eval`` parser with its three subcommands."""
    parser = argparse.ArgumentParser(prog="python -m glare.eval",
                                     description="Evaluate a GLARE export or an initialisation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{linear,knn,mmseg}")

    linear = sub.add_parser("linear", help="linear segmentation probe (mIoU) on the configured labelled set",
                            description="Train a BatchNorm + 1x1 conv head on frozen patch features of the "
                                        "last eval.last_blocks blocks and report val mIoU.")
    _add_common(linear, "probe_result.json")

    knn = sub.add_parser("knn", help="k-NN / linear classification on global-token features of image folders",
                         description="Classify root/<class>/*.png|jpg test images by the global token "
                                     "(model.global_token, 0 = [CLS]) of the training images.")
    _add_common(knn, "knn_result.json")
    knn.add_argument("--train", required=True, help="training tree root/<class>/*.png|jpg")
    knn.add_argument("--test", required=True, help="test tree with the same class folders")
    knn.add_argument("--size", type=int, default=224, help="square image size (default: 224)")
    knn.add_argument("--k", type=int, default=20, help="neighbours (default: 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote temperature (default: 0.07)")

    # Registered for --help only: main() forwards everything after "mmseg" to the runner untouched.
    mmseg = sub.add_parser("mmseg", help="mmsegmentation fine-tuning / evaluation (arguments go to its runner)",
                           add_help=False)
    mmseg.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _load(args: argparse.Namespace) -> tuple[GlareConfig, nn.Module]:
    """The config (preset + overrides) and the encoder; random inits are seeded with ``eval.seed``."""
    from glare.models.pretrained import load_encoder
    from glare.weights.export import arch_notice

    cfg = load_config(None if args.config == "none" else args.config, args.overrides)
    if notice := arch_notice(args.weights, cfg.model):
        print(notice, flush=True)
    torch.manual_seed(cfg.eval.seed)  # weights "none" draws the random init from the global RNG
    return cfg, load_encoder(args.weights, cfg.model, device=args.device).eval()


def _write_json(path: str | Path, record: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _provenance(args: argparse.Namespace) -> dict[str, Any]:
    return {"weights": args.weights, "config": args.config, "overrides": list(args.overrides)}


def run_linear(args: argparse.Namespace) -> dict[str, Any]:
    """Linear probe of ``--weights`` on the configured labelled set; prints the table, writes and returns the JSON."""
    from glare.eval.protocol import load_probe_data, run_probe

    cfg, model = _load(args)
    data = load_probe_data(cfg.data, cfg.eval, multiple=model.patch_size)
    result = run_probe(partial(model.dense_features, last_blocks=cfg.eval.last_blocks), data, cfg.eval, args.device)
    print(result.table())
    shape = tuple(data.val[0].shape[-2:])
    print(f"{cfg.data.seg_format} set: {len(data.train[0])} {cfg.data.seg_train_split} / {len(data.val[0])} "
          f"{cfg.data.seg_eval_split} images at {shape[0]}x{shape[1]} px, {data.num_classes} classes")
    record = {**result.to_dict(), "num_classes": data.num_classes, "image_size": list(shape),
              "train_images": len(data.train[0]), "eval_images": len(data.val[0]), **_provenance(args)}
    print(f"wrote {_write_json(args.out, record)}")
    return record


def run_knn(args: argparse.Namespace) -> dict[str, Any]:
    """k-NN and linear classification on global-token features; prints a summary, writes and returns the JSON."""
    from glare.eval.knn import evaluate_classification, load_image_folder

    cfg, model = _load(args)
    train_images, train_labels, classes = load_image_folder(args.train, args.size)
    test_images, test_labels, test_classes = load_image_folder(args.test, args.size)
    if test_classes != classes:
        raise ValueError(f"--test classes {test_classes} differ from --train classes {classes}")
    token = cfg.model.global_token

    def global_features(x: torch.Tensor) -> torch.Tensor:
        return model.features(x).prefix[:, token]

    scores = evaluate_classification(global_features, (train_images, train_labels), (test_images, test_labels),
                                     len(classes), k=args.k, temperature=args.temperature, seed=cfg.eval.seed,
                                     device=args.device)
    print(f"k-NN top-1 {100 * scores['knn_top1']:.2f}  linear top-1 {100 * scores['linear_top1']:.2f}  "
          f"({scores['n_train']} train / {scores['n_test']} test images, {len(classes)} classes, "
          f"{scores['feature_dim']}-dim token {token})")
    record = {**scores, "classes": classes, "train": str(args.train), "test": str(args.test), "size": args.size,
              **_provenance(args)}
    print(f"wrote {_write_json(args.out, record)}")
    return record


def run_mmseg(argv: list[str]) -> int:
    """Hand the arguments to the mmsegmentation runner (imported only here: it needs mmseg installed)."""
    try:
        runner = importlib.import_module("glare.eval.mmseg.runner")
    except ModuleNotFoundError as err:
        hint = "" if (err.name or "").startswith("glare") else " (install the extra: pip install 'glare[mmseg]')"
        print(f"error: mmseg evaluation is unavailable: {err}{hint}", file=sys.stderr)
        return 2
    return int(runner.main(argv) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with one ``error:`` line for user mistakes)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["mmseg"]:
        return run_mmseg(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        {"linear": run_linear, "knn": run_knn}[args.command](args)
    except (ValueError, OSError) as err:  # ConfigError, WeightsError, ExportError, DataError are ValueErrors
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
