"""``python -m glare.report RUN_DIR``: the run report, ``report.md`` with its PNGs, built from a run directory alone.

It reads what every run leaves (``config.yaml``, ``metrics.jsonl``, ``summary.json`` and
``export/backbone.safetensors``), so it works on a finished, stopped or resumed run, and writes
beside them:

- ``report.md``: what ran (the config's differences from the nearest preset, data sizes, skipped
  files, time, images/s, trainable parameters), the outcome (mIoU before and after, per-class IoU
  before/after/delta) and the pictures;
- ``curves.png``: each loss term, each term's teacher entropy, the learning rate and the mIoU at
  every evaluation;
- ``attention.png``, ``pca.png``, ``segmentation.png``: the same few validation images through the
  initialisation ("before") and the adapted backbone ("after"), drawn by :mod:`glare.viz`.

``glare.train`` writes it at the end of every run and the sweep for its best trial.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glare.config import CONFIG_DIR, ConfigError, GlareConfig, load_config, to_dict

TERMS = ("glob", "reg", "loc1", "loc2")
PICTURES = ("attention", "pca", "segmentation")
# The pictures' cost stays small next to a run's: a probe fitted on few, small images for a few steps.
PICTURE_SIZE = 112  # pixels at most (the run's eval.img_size if smaller)
PROBE_TRAIN_LIMIT = 32  # labelled train images the pictures' probe is fitted on (the numbers use all)
PROBE_STEPS = 100  # at most


class ReportError(ValueError):
    """The folder is not a run directory (or one of its files cannot be read)."""


@dataclass
class RunRecords:
    """What metrics.jsonl holds, sorted by step; a step logged twice (redone after a restart) keeps its last record."""

    train: list[dict[str, Any]] = field(default_factory=list)  # the logged steps: losses, entropies, lr, ...
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, mIoU) at every evaluation, before included
    probes: list[dict[str, Any]] = field(default_factory=list)  # "probe" events: per-class IoU at an evaluation
    end: dict[str, Any] | None = None  # the last "end" event


def read_metrics(path: Path) -> RunRecords:
    """Parse a run's metrics.jsonl (a torn last line, as a killed run leaves it, is skipped)."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    probes: dict[int, dict[str, Any]] = {}
    out = RunRecords()
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        event = rec.get("event")
        if event == "end":
            out.end = rec
        elif event == "probe":
            probes[rec["step"]] = rec
            evals[rec["step"]] = rec["miou"]
        elif event is None and "loss" in rec:
            train[rec["step"]] = rec
        elif event is None and "miou" in rec:
            evals[rec["step"]] = rec["miou"]
    if out.end is not None and 0 not in evals and _finite(out.end.get("miou_before")):
        evals[0] = out.end["miou_before"]  # runs from before the "probe" events
    out.train = [train[s] for s in sorted(train)]
    out.evals = sorted(evals.items())
    out.probes = [probes[s] for s in sorted(probes)]
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _flat_config(cfg: GlareConfig) -> dict[str, Any]:
    """``{"section.key": value}``, values as JSON has them (tuples and lists alike)."""
    return _flat(json.loads(json.dumps(to_dict(cfg))))


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, sub in data.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): data}


def config_diff(cfg: GlareConfig) -> tuple[str, list[tuple[str, Any, Any]]]:
    """The preset in ``configs/`` (or the built-in defaults) closest to ``cfg``, and its differing values.

    Returns ``(name, [(key, preset value, run value), ...])``.
    """
    run = _flat_config(cfg)
    bases: list[tuple[str, dict[str, Any]]] = [("built-in defaults", _flat_config(GlareConfig()))]
    for preset in sorted(CONFIG_DIR.glob("*.yaml")):
        try:
            bases.append((f"preset `{preset.stem}`", _flat_config(load_config(preset))))
        except ConfigError:
            continue
    diffs = [(name, [(k, base.get(k), v) for k, v in run.items() if base.get(k) != v]) for name, base in bases]
    return min(diffs, key=lambda d: len(d[1]))


# ----------------------------------------------------------------------------- figures


def curves_figure(records: RunRecords, path: Path) -> Path | None:
    """Loss terms, teacher entropy per term, learning rate and mIoU against the step, as one 2x2 PNG."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not records.train and not records.evals:
        return None
    steps = [r["step"] for r in records.train]
    style = {"marker": "o", "markersize": 3} if len(steps) <= 30 else {}
    fig = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    (ax_loss, ax_ent), (ax_lr, ax_miou) = fig.subplots(2, 2)

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in records.train if _finite(r.get(key))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    ax_loss.plot(*series("loss"), color="black", linewidth=2, label="total (weighted)", **style)
    for term in TERMS:
        if any(term in r for r in records.train):
            ax_loss.plot(*series(term), label=f"L_{term}", **style)
    ax_loss.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats)")
    for term in TERMS:
        key = f"teacher_entropy_{term}"
        if any(key in r for r in records.train):
            ax_ent.plot(*series(key), label=term, **style)
    ax_ent.axhline(0.95, color="grey", linestyle="--", linewidth=1, label="near-uniform (0.95)")
    ax_ent.set(title="Teacher entropy per term", xlabel="step", ylabel="entropy / ln K", ylim=(0, 1.05))
    ax_lr.plot(*series("lr"), color="tab:purple", **style)
    ax_lr.set(title="Learning rate (adapters)", xlabel="step", ylabel="lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if records.evals:
        ax_miou.plot([s for s, _ in records.evals], [100 * m for _, m in records.evals], marker="o",
                     color="tab:green")
        for s, m in records.evals:
            ax_miou.annotate(f"{100 * m:.2f}", (s, 100 * m), textcoords="offset points", xytext=(0, 6),
                             ha="center", fontsize=8)
        ax_miou.margins(y=0.25)
    ax_miou.set(title="Linear-probe mIoU (val)", xlabel="step (0 = before training)", ylabel="mIoU (%)")
    for ax in (ax_loss, ax_ent):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in (ax_loss, ax_ent, ax_lr, ax_miou):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path


def before_after_models(run_dir: Path, cfg: GlareConfig, device: str) -> list[tuple[str, Any]]:
    """("before", the initialisation) and ("after", the exported adapted backbone).

    With adapters (the frozen backbone unchanged), "before" is the export's own backbone with fresh,
    zero-output adapters: exactly the model at step 0, whatever the init (a random one included).
    """
    import torch

    from glare.models.pretrained import load_encoder
    from glare.models.vit import AdaptedViT

    after = load_encoder(run_dir / "export" / "backbone.safetensors", device=device).eval()
    if cfg.model.tune == "adapters":
        before = AdaptedViT(copy.deepcopy(after.vit), adapter_cfg=cfg.model.adapter).to(device).eval()
    else:  # full fine-tuning changed the backbone: rebuild the init (a random one from the run's seed)
        torch.manual_seed(cfg.train.seed)
        before = load_encoder(cfg.model.weights, cfg.model, device=device).eval()
    return [("before", before), ("after", after)]


def picture_figures(run_dir: Path, cfg: GlareConfig, out: Path, num_images: int = 3, device: str = "cpu"
                    ) -> list[Path]:
    """Attention, PCA and probe-prediction PNGs of the first ``num_images`` val images, before and after.

    At most :data:`PICTURE_SIZE` pixels, with a probe of at most :data:`PROBE_STEPS` steps on
    :data:`PROBE_TRAIN_LIMIT` images: seconds, where the scored probe takes minutes on a CPU.
    """
    import torch

    from glare.eval.protocol import load_probe_data
    from glare.viz import attention_figure, pca_figure, segmentation_figure

    ev = dataclasses.replace(cfg.eval, img_size=min(cfg.eval.img_size, PICTURE_SIZE),
                             probe_steps=min(cfg.eval.probe_steps, PROBE_STEPS))
    data = load_probe_data(cfg.data, ev, limit=PROBE_TRAIN_LIMIT)
    images, labels = data.val[0][:num_images], data.val[1][:num_images]
    models = before_after_models(run_dir, cfg, device)
    with torch.no_grad():
        written = [attention_figure(models, images, out / "attention.png", cfg.model.global_token),
                   pca_figure(models, images, out / "pca.png")]
    written.append(segmentation_figure(models, images, labels, data.train, data.num_classes, data.class_names,
                                       ev, out / "segmentation.png"))
    return written


# ----------------------------------------------------------------------------- the markdown


def _pct(value: Any, signed: bool = False) -> str:
    if not _finite(value):
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def class_rows(names: Sequence[str], before: Sequence[float | None], after: Sequence[float | None]
               ) -> list[tuple[str, str, str, str]]:
    """(class, IoU before %, IoU after %, delta points) per class; n/a where a class was not scored."""
    rows = []
    for name, b, a in zip(names, before, after, strict=True):
        delta = a - b if _finite(a) and _finite(b) else None
        rows.append((name, _pct(b), _pct(a), _pct(delta, signed=True)))
    return rows


def _per_class(summary: dict[str, Any], records: RunRecords) -> tuple[list[str], list, list] | None:
    """Class names and per-class IoU before and after, from summary.json or the run's probe events."""
    if summary.get("per_class_iou_before") and summary.get("per_class_iou_after"):
        return summary["class_names"], summary["per_class_iou_before"], summary["per_class_iou_after"]
    if len(records.probes) >= 2 and records.probes[0]["step"] == 0:
        first, last = records.probes[0], records.probes[-1]
        return first["class_names"], first["per_class_iou"], last["per_class_iou"]
    return None


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "n/a"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def _what_ran(cfg: GlareConfig, summary: dict[str, Any], records: RunRecords) -> list[str]:
    end = records.end or {}
    steps = summary.get("steps", end.get("step"))
    images = summary.get("images_seen", end.get("images_seen"))
    trainable, backbone = summary.get("trainable_params"), summary.get("backbone_params")
    share = f" ({100 * trainable / backbone:.1f} % of the backbone's {_count(backbone)})" \
        if _finite(trainable) and _finite(backbone) and backbone else ""
    labelled = summary.get("labelled_images") or {}
    rate = summary.get("images_per_s")
    rows = [
        ("init", f"`{cfg.model.weights}` ({cfg.model.arch}, {cfg.model.tune})"),
        ("steps", f"{steps} of {cfg.train.steps}, {cfg.train.batch_size} images per worker x {cfg.ray.num_workers} "
                  f"worker(s); {images} images seen"),
        ("unlabelled images", (f"{summary['pretrain_images']} " if summary.get("pretrain_images") is not None else "")
         + f"(`{cfg.data.source}`" + {True: ", materialised", False: ", streamed"}.get(summary.get("materialized"), "")
         + ")"),
        ("labelled set", f"`{cfg.data.seg_format}`: {labelled.get('train', 'n/a')} train / "
                         f"{labelled.get('val', 'n/a')} val images, {labelled.get('classes', 'n/a')} classes"),
        ("skipped files", str(summary.get("skipped_images", "n/a"))),
        ("time", f"{summary['wall_s']:.0f} s in all, {summary.get('train_s') or 0:.0f} s in training steps"
         if _finite(summary.get("wall_s")) else "n/a"),
        ("throughput", f"{rate:.1f} images/s" if _finite(rate) else "n/a"),
        ("trainable parameters", f"{_count(trainable)}{share}"),
        ("non-finite steps skipped", str(summary.get("nonfinite_steps", end.get("nonfinite_steps", "n/a")))),
    ]
    lines = ["## What ran", "", *_table(("", ""), rows, "ll"), ""]
    for item in summary.get("skipped_files") or []:
        lines.append(f"- skipped `{item['path']}`: {item['reason']}")
    base, diff = config_diff(cfg)
    lines += ["", f"Config: {base}" + (" with these changes:" if diff else ", unchanged."), ""]
    if diff:
        lines += _table(("key", base.removeprefix("preset ").replace("built-in defaults", "default"), "this run"),
                        [(f"`{k}`", f"`{json.dumps(b)}`", f"`{json.dumps(v)}`") for k, b, v in diff], "lll")
    return lines + [""]


def write_report(run_dir: str | Path, pictures: bool = True, num_images: int = 3, device: str = "cpu") -> Path:
    """Build ``report.md`` and its PNGs in ``run_dir`` from the run's files; returns the report's path.

    Raises:
        ReportError: ``run_dir`` lacks config.yaml or metrics.jsonl, or one of them cannot be read.
    """
    run_dir = Path(run_dir)
    for name in ("config.yaml", "metrics.jsonl"):
        if not (run_dir / name).is_file():
            raise ReportError(f"{run_dir} is not a run directory: no {name}")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as err:
        raise ReportError(f"{run_dir / 'config.yaml'}: {err}") from None
    records = read_metrics(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    end = records.end or {}
    before = summary.get("miou_before", end.get("miou_before"))
    after = summary.get("miou_after", end.get("miou") if end else None)
    stop = summary.get("stop_reason", end.get("stop_reason", ""))
    state = f"stopped: {stop}" if stop else ("finished" if end else "not finished (no closing record yet)")
    lines = [f"# GLARE run report: {run_dir.name}", "",
             f"`{run_dir}` · {state} · built {time.strftime('%Y-%m-%d %H:%M')} by `python -m glare.report`", "",
             "## Outcome", ""]
    if _finite(before) and _finite(after):
        steps = summary.get("steps", end.get("step"))
        lines.append(f"Linear-probe mIoU on the `{cfg.data.seg_format}` val split: **{_pct(before)} → {_pct(after)}** "
                     f"({_pct(after - before, signed=True)} points) after {steps} steps.")
    else:
        lines.append(f"Linear-probe mIoU: before {_pct(before)}, after {_pct(after)}.")
    per_class = _per_class(summary, records)
    if per_class:
        lines += ["", *_table(("class", "IoU before (%)", "IoU after (%)", "Δ (points)"), class_rows(*per_class))]
    lines += [""] + _what_ran(cfg, summary, records)

    lines += ["## Curves", ""]
    if curves_figure(records, run_dir / "curves.png"):
        lines += ["Each loss term and its teacher's per-image entropy (as a fraction of ln K; near 1 = uniform "
                  "targets, nothing learned), the adapters' learning rate, and the mIoU at every evaluation.", "",
                  "![curves](curves.png)", ""]
    else:
        lines += ["No step was logged yet.", ""]

    lines += ["## Pictures", ""]
    export = run_dir / "export" / "backbone.safetensors"
    if not pictures:
        lines += ["Not drawn (`--no-pictures`).", ""]
    elif not export.is_file():
        lines += [f"No export ({export.relative_to(run_dir)}) yet: the run has not finished.", ""]
    else:
        picture_figures(run_dir, cfg, run_dir, num_images, device)
        lines += [f"The first {num_images} val images through the initialisation (before) and the adapted backbone "
                  "(after), one above the other.", "",
                  "Last-block attention of the global token, per head:", "", "![attention](attention.png)", "",
                  "First three principal components of the patch features as RGB (fitted per model over the shown "
                  "images):", "", "![pca](pca.png)", "",
                  f"Linear-probe predictions next to the ground truth (for speed, a probe fitted on the first "
                  f"{PROBE_TRAIN_LIMIT} labelled train images at up to {PICTURE_SIZE} px for up to {PROBE_STEPS} "
                  "steps, not the scored one):", "",
                  "![segmentation](segmentation.png)", ""]
    lines += ["## Files", "", "- `config.yaml`: the resolved config (`python -m glare.train --config` reruns it)",
              "- `metrics.jsonl`, `tensorboard/`: every logged step", "- `summary.json`: the numbers above",
              "- `export/backbone.safetensors`, `export/backbone_mmseg.safetensors`: the adapted backbone", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glare.report",
                                     description="Build a run directory's report.md and PNGs from its files alone.")
    parser.add_argument("run_dir", help="a glare.train run directory (train.storage_path/train.run_name)")
    parser.add_argument("--num-images", type=int, default=3, help="val images in the pictures (default: 3)")
    parser.add_argument("--no-pictures", action="store_true", help="skip the attention/PCA/probe pictures")
    parser.add_argument("--device", default="cpu", help="device for the pictures' models (default: cpu)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m glare.report``; a bad run directory prints one ``error:`` line and returns 2."""
    args = parse_args(argv)
    try:
        path = write_report(args.run_dir, not args.no_pictures, args.num_images, args.device)
    except (ReportError, OSError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
