"""Fine-tune and evaluate GLARE weights through mmsegmentation (mmengine's Runner: train, then IoU on val).

``python -m glare.eval mmseg --weights W --config NAME`` (or ``python -m glare.eval.mmseg.runner``):

- ``--weights``: a GLARE export (``.safetensors``, either layout) or an init spec that
  :func:`glare.weights.export.load_encoder` understands (``imgfocus``, ``none``, ``timm``, a foreign
  ViT checkpoint) combined with the config's ``arch``;
- ``--config``: a config name from ``configs/`` (``upernet_ade20k``, ``fpn_cityscapes``, ``upernet_mosaic``...)
  or a path to any mmseg config using the ``GlareViT`` backbone.

The configs are written for ViT-S; the neck and head channels are set to the loaded backbone's width.
The final validation's numbers go to ``<work-dir>/mmseg_result.json`` (fractions in [0, 1]).

Checkpoints: mmengine's checkpoints carry numpy objects that ``torch.load`` refuses by default since
torch 2.6 (``weights_only=True``; mmengine 0.10.7 does not pass it). The runner never loads one: the
backbone's weights come from our safetensors export, and the CI-sized ``upernet_mosaic`` config saves
none. The public-set configs keep mmengine's CheckpointHook so long runs leave their weights behind;
load those with ``torch.load(path, weights_only=False)``, only for files you wrote yourself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.dist import broadcast_object_list, is_main_process
from mmengine.runner import Runner
from mmseg.registry import MODELS

from glare.eval.mmseg import GlareIoUMetric  # installs the mmcv shim, registers GlareViT & co.
from glare.weights.export import ExportError
from glare.weights.loading import WeightsError

CONFIG_DIR = Path(__file__).parent / "configs"
RESULT_FILE = "mmseg_result.json"
_MOSAIC_DATASET = "GlareMosaicDataset"
_LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")


class MmsegRunError(ValueError):
    """Bad arguments for an mmseg run: unknown config, missing data, a config that does not fit the backbone."""


def available_configs() -> list[str]:
    """Names of the runnable configs in ``configs/`` (the ``_*.py`` files are shared parts)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file: a name from ``configs/`` (with or without ``.py``) or an existing path."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".py")
    if name in available_configs() and path.parent == Path("."):
        return CONFIG_DIR / f"{name}.py"
    raise MmsegRunError(f"no mmseg config {str(name_or_path)!r}: give a path or one of {available_configs()}")


def _leaf_datasets(cfg: Config) -> list[ConfigDict]:
    """The innermost dataset dict of each data loader (wrappers such as RepeatDataset nest ``dataset``)."""
    found = []
    for key in _LOADERS:
        ds = (cfg.get(key) or {}).get("dataset")
        while ds is not None and ds.get("dataset") is not None:
            ds = ds["dataset"]
        if ds is not None:
            found.append(ds)
    return found


def _set_data_root(cfg: Config, data_root: str | Path | None) -> None:
    """Point every dataset at ``data_root`` (the embedded mosaic when a mosaic config gets none) and check it."""
    datasets = _leaf_datasets(cfg)
    if data_root is None and any(ds.get("type") == _MOSAIC_DATASET for ds in datasets):
        from glare.config import MosaicConfig
        from glare.data.sources import embedded_root

        data_root = embedded_root(MosaicConfig())
    for ds in datasets:
        if data_root is not None:
            ds.data_root = str(data_root)
        images = Path(ds.get("data_root") or ".") / (ds.get("data_prefix") or {}).get("img_path", "")
        if not images.is_dir():
            raise MmsegRunError(f"{ds.get('type')}: no image folder {images}; pass --data-root (the data set's "
                                "folder in the layout the config documents)")


def _rescale_schedule(cfg: Config, iters: int) -> None:
    """Run ``iters`` iterations, stretching warm-up and decay of the lr schedule to match.

    A scheduler left with fewer than 2 iterations is dropped: mmengine steps one ``end - begin - 1``
    times, so it would only apply its start factor (a warm-up stuck at 1e-6).
    """
    if iters < 1:
        raise MmsegRunError(f"--iters must be >= 1, got {iters}")
    old = int(cfg.train_cfg.max_iters)
    cfg.train_cfg.max_iters = iters
    schedulers = cfg.get("param_scheduler") or []
    kept = []
    for sched in [schedulers] if isinstance(schedulers, dict) else schedulers:
        begin = round(sched.get("begin", 0) * iters / old)
        end = iters if sched.get("end", old) >= old else round(sched["end"] * iters / old)
        if end - begin >= 2:
            sched.begin, sched.end = begin, end
            kept.append(sched)
    cfg.param_scheduler = kept
    logger = (cfg.get("default_hooks") or {}).get("logger")
    if logger is not None:
        logger.interval = min(int(logger.get("interval", 50)), iters)


def _set_workers(cfg: Config, num_workers: int) -> None:
    """Data-loader worker processes for every loader (persistent workers need at least one)."""
    for key in _LOADERS:
        if cfg.get(key) is not None:
            cfg[key].num_workers = num_workers
            cfg[key].persistent_workers = num_workers > 0


def _fit_channels(model: ConfigDict, width: int) -> None:
    """Set the channel counts fed by the backbone to its ``width`` (the configs are written for ViT-S).

    The first neck reads one map per out index; a MultiLevelNeck that keeps the width (as written)
    follows it; a second neck (Semantic FPN's FPN) then reads that, and the heads read the last neck.
    """
    levels = len(model.backbone.get("out_indices", (3, 5, 7, 11)))
    necks = model.get("neck")
    necks = [] if necks is None else list(necks) if isinstance(necks, list) else [necks]
    out = width
    if necks:
        first = necks[0]
        written = list(first.in_channels)
        if len(written) != levels:
            raise MmsegRunError(f"the backbone gives {levels} maps (out_indices) but the neck takes "
                                f"{len(written)} (in_channels={written})")
        first.in_channels = [width] * levels
        if first.get("out_channels") == written[0]:
            first.out_channels = width
        out = first.out_channels
        if len(necks) > 1:
            necks[1].in_channels = [out] * len(necks[1].in_channels)
            return  # the heads read the second neck, whose width the config sets
    for key in ("decode_head", "auxiliary_head"):
        heads = model.get(key)
        for head in heads if isinstance(heads, list) else [heads] if heads else []:
            head.in_channels = [out] * len(head.in_channels) if isinstance(head.in_channels, list) else out


def backbone_width(model: ConfigDict) -> int:
    """Embedding width of the configured backbone, built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        try:
            backbone = MODELS.build(model.backbone)
        except (TypeError, ValueError) as err:
            raise MmsegRunError(f"cannot build the backbone {model.backbone.get('type')}: {err}") from None
    return int(backbone.embed_dim)


def build_config(weights: str | Path, config: str | Path, *, data_root: str | Path | None = None,
                 work_dir: str | Path | None = None, iters: int | None = None, val_interval: int | None = None,
                 batch_size: int | None = None, num_workers: int | None = None, seed: int = 0,
                 launcher: str = "none", cfg_options: dict[str, Any] | None = None) -> Config:
    """Load an mmseg config and apply the run's settings (``cfg_options`` first, as mmseg's train.py does)."""
    path = resolve_config(config)
    cfg = Config.fromfile(str(path))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.model.backbone.get("type") != "GlareViT":
        raise MmsegRunError(f"{path} does not use the GlareViT backbone (got {cfg.model.backbone.get('type')!r})")
    cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=str(weights), prefix="backbone.")
    _set_data_root(cfg, data_root)
    if iters is not None:
        _rescale_schedule(cfg, iters)
    if val_interval is not None:
        if val_interval < 1:
            raise MmsegRunError(f"--val-interval must be >= 1, got {val_interval}")
        cfg.train_cfg.val_interval = val_interval
    if batch_size is not None:
        if batch_size < 1:
            raise MmsegRunError(f"--batch-size must be >= 1, got {batch_size}")
        cfg.train_dataloader.batch_size = batch_size
    if num_workers is not None:
        _set_workers(cfg, num_workers)
    _fit_channels(cfg.model, backbone_width(cfg.model))
    cfg.work_dir = str(work_dir or Path("work_dirs") / "mmseg" / path.stem)
    cfg.randomness = dict(seed=seed)
    cfg.launcher = launcher
    return cfg


def _final_fractions(runner: Runner) -> dict:
    """The unrounded metrics of the run's last validation (computed on rank 0, shared with every rank)."""
    metrics = [m for m in runner.val_loop.evaluator.metrics if isinstance(m, GlareIoUMetric)]
    if not metrics:
        raise MmsegRunError("the config's val_evaluator needs a GlareIoUMetric (mmseg's IoUMetric that keeps "
                            "per-class values)")
    shared = [metrics[0].fractions]
    broadcast_object_list(shared)  # in place; a no-op without distributed training
    fractions = shared[0]
    if fractions is None:
        raise MmsegRunError("the run never validated: the config needs val_dataloader and val_cfg")
    return fractions


def run_mmseg(weights: str | Path, config: str | Path, *, device: str | None = None, **settings: Any) -> dict:
    """Fine-tune on the config's train split, validate, and write ``mmseg_result.json`` in the work dir.

    Args:
        weights, config: see the module docstring.
        device: "cpu" or "cuda"; None lets mmengine choose (CUDA when available).
        settings: keyword arguments of :func:`build_config`.

    Returns:
        The result: mIoU, aAcc, mAcc (fractions), per-class IoU / accuracy (None where a class is
        absent from labels and predictions), config, weights and iterations.
    """
    if device not in (None, "cpu", "cuda"):
        raise MmsegRunError(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise MmsegRunError("--device cuda, but CUDA is not available")
    if device == "cpu" and settings.get("launcher", "none") != "none":
        raise MmsegRunError("--device cpu trains in one process; drop --launcher")
    cfg = build_config(weights, config, **settings)
    runner = Runner.from_cfg(cfg)
    if device == "cpu":
        # mmengine places the model on CUDA whenever it exists; move it back (nothing else holds state yet).
        runner.model.to("cpu")
    runner.train()
    fractions = _final_fractions(runner)
    result = {
        "mIoU": fractions["mIoU"],
        "aAcc": fractions["aAcc"],
        "mAcc": fractions["mAcc"],
        "per_class_iou": fractions["IoU"],
        "per_class_acc": fractions["Acc"],
        "config": str(resolve_config(config)),
        "weights": str(weights),
        "iters": int(cfg.train_cfg.max_iters),
    }
    if is_main_process():
        out = Path(cfg.work_dir) / RESULT_FILE
        out.write_text(json.dumps(result, indent=2))
        miou = "n/a" if result["mIoU"] is None else f"{100 * result['mIoU']:.2f}"
        print(f"mmseg {Path(result['config']).stem}: mIoU {miou} after {result['iters']} iterations -> {out}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m glare.eval mmseg",
        description="Fine-tune GLARE weights with an mmsegmentation config and report val mIoU.")
    parser.add_argument("--weights", required=True,
                        help="GLARE export (.safetensors) or init spec: imgfocus, none, timm, a ViT checkpoint")
    parser.add_argument("--config", required=True, help=f"config path or name: {', '.join(available_configs())}")
    parser.add_argument("--data-root", help="data set folder (default: the config's; generated for the mosaic)")
    parser.add_argument("--work-dir", help="logs and mmseg_result.json (default: work_dirs/mmseg/<config>)")
    parser.add_argument("--iters", type=int, help="training iterations; the lr schedule is stretched to match")
    parser.add_argument("--val-interval", type=int, help="validate every N iterations (and after the last)")
    parser.add_argument("--batch-size", type=int, help="training images per GPU / process")
    parser.add_argument("--num-workers", type=int, help="data-loader worker processes per loader")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--launcher", choices=("none", "pytorch", "slurm"), default="none",
                        help="distributed launcher (pytorch: under torchrun)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config entries, e.g. model.backbone.out_indices=[0,1,2,3]")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status (2 on bad input)."""
    args = parse_args(argv)
    try:
        run_mmseg(args.weights, args.config, device=args.device, data_root=args.data_root, work_dir=args.work_dir,
                  iters=args.iters, val_interval=args.val_interval, batch_size=args.batch_size,
                  num_workers=args.num_workers, seed=args.seed, launcher=args.launcher, cfg_options=args.cfg_options)
    except (MmsegRunError, ExportError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
