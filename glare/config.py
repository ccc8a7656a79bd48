"""One typed configuration for every part of GLARE.

The dataclasses below are the schema: defaults live here, YAML presets in
``configs/`` and ``key=value`` overrides are merged on top through OmegaConf
structured configs (which reject unknown keys and wrong types), and
:func:`validate` checks ranges and cross-field rules before anything heavy
starts. The same object is what Ray Tune's search space writes into.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement-group strategies


MATERIALIZE_MODES = ("auto", "true", "false")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class AdapterConfig:
    """UniAdapter (visual branch) placed parallel to each block's MLP."""

    bottleneck: int = 64
    scale: float = 0.1
    learnable_scale: bool = False
    # Adapters in blocks first_block..depth-1 only. 0 (every block) is the paper's setting. A later first
    # block is cheaper, not free: nothing below it needs a graph, so the student's backward and its
    # saved activations shrink to the adapted blocks (benchmarks/README.md measures it).
    first_block: int = 0


@dataclass
class HeadConfig:
    """DINO projection head: MLP -> L2-normalised bottleneck -> K prototypes."""

    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    out_dim: int = 4096
    layers: int = 3


@dataclass
class ModelConfig:
    """Backbone, adapters, heads and the teacher's EMA schedule."""

    arch: str = "vit_small_patch14_dinov2"
    # "imgfocus" (offline DINOv2-S/14), "none" (random init), "timm" (hub weights
    # of `arch`), or a path to a timm / DINO / UDI / safetensors checkpoint.
    weights: str = "imgfocus"
    img_size: int = 224
    # Extra timm.create_model kwargs, e.g. {embed_dim: 64, depth: 2} for tests.
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    # Which prefix token feeds the global loss (0 = [CLS]; UDI's image-level token).
    global_token: int = 0
    # "adapters": GLARE's setting, frozen backbone + UniAdapters. "full": the whole
    # student backbone trains (teacher = its EMA), the forgetting-prone baseline.
    tune: str = "adapters"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    # The patch-level head of L_loc1/L_loc2. It runs on ~90 % of all patch tokens (the global head on a
    # few tokens per image), so it is narrower: as wide as `head` it was a quarter of a step's FLOPs
    # (benchmarks/README.md). It always starts from random init: checkpoints carry no patch head.
    local_head: HeadConfig = field(default_factory=lambda: HeadConfig(hidden_dim=512, out_dim=2048))
    # How the DINO heads start. "auto": a head the checkpoint carries (DINO, UDI) is kept, every other
    # head is bootstrapped from the init's tokens on the first images (glare/models/bootstrap.py);
    # "data": bootstrap every head; "random": plain random init (targets near ln K on a headless init).
    head_init: str = "auto"
    head_init_images: int = 256
    momentum_start: float = 0.996
    momentum_end: float = 1.0


@dataclass
class LossConfig:
    """Weights of the four consistency terms and DINO's temperatures/centres."""

    glob: float = 1.0
    reg: float = 1.0
    loc1: float = 1.0
    loc2: float = 1.0
    student_temp: float = 0.1
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_steps: int = 100
    center_momentum: float = 0.9


@dataclass
class RegionConfig:
    """Attention-guided region sampling and region correspondence."""

    num_regions: int = 6
    top_q: float = 0.15
    correspondence: str = "cross_attention"  # or "geometric"


@dataclass
class AugmentConfig:
    """Two DINO-style global views (Kornia) and the per-patch distortion."""

    view_size: int = 224
    crop_scale: tuple[float, float] = (0.4, 1.0)
    min_overlap: float = 0.3
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    # Patch distortion ("patch blurring"): fraction of patches, blur sigma range.
    patch_fraction: float = 0.3
    blur_sigma: tuple[float, float] = (1.0, 3.0)
    patch_noise_p: float = 0.0
    patch_noise_std: float = 0.1
    patch_jitter_p: float = 0.0


@dataclass
class MosaicConfig:
    """The embedded real-texture mosaic data set (generated once, cached)."""

    num_classes: int = 10
    image_size: int = 224
    train: int = 200
    val: int = 60
    unlabelled: int = 200
    seed: int = 0
    cache_dir: str = ""  # empty: ~/.cache/glare/mosaic


@dataclass
class DataConfig:
    """Where pre-training images and the labelled evaluation set come from."""

    # "mosaic" (embedded default), a folder, a glob, a .txt list, a .parquet
    # file or any URI Ray Data reads (s3://, gs://).
    source: str = "mosaic"
    image_column: str = "image"
    base_size: int = 256
    # Keep every decoded image in Ray's object store ("true": fast epochs) or decode while streaming
    # ("false"). "auto" materialises a set whose decoded size (images x base_size^2 x 3 bytes) fits in
    # half the object store and streams a larger one; the run's data line says which it used.
    materialize: str = "auto"
    # Rows each worker shuffles per epoch (Ray Data's local shuffle buffer, seeded by train.seed, the
    # epoch and the rank, so a resumed run replays the same order); 0 keeps the stored order.
    shuffle_buffer: int = 1024
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)
    # Labelled set for the linear probe: "mosaic", or a reader name
    # (ade20k, cityscapes, pascal_context, loveda, voc, generic) with `seg_root`.
    seg_format: str = "mosaic"
    seg_root: str = ""
    # Your own labelled set (seg_format=generic): <root>/<split>/{images,masks} or <root>/{images,masks}/<split>,
    # masks are single-channel PNGs of class indices. The classes: seg_class_names, else a classes.txt or
    # class_names.txt in seg_root (one name a line), else seg_num_classes numbered ones (0: from the names).
    seg_num_classes: int = 0
    seg_class_names: list[str] = field(default_factory=list)
    seg_ignore_index: int = 255  # the mask value of unlabelled ("void") pixels
    seg_zero_is_void: bool = False  # 0 is unlabelled and the classes are 1..N (mmseg's reduce_zero_label)
    # The split the probe trains on and the one it scores (any format; e.g. "test" for a generic set).
    seg_train_split: str = "train"
    seg_eval_split: str = "val"


@dataclass
class OptimConfig:
    """AdamW with warm-up + cosine lr and a cosine weight-decay ramp."""

    lr: float = 5e-4  # per 256 images; scaled by the global batch
    # The DINO heads' lr relative to `lr` (adapters and region cross-attention train at `lr`). 0 holds the
    # heads at their initial weights (bootstrapped or loaded): on short runs a trained head collapses
    # onto the batch-mean target within a few steps and its targets go uniform (README, "The method").
    head_lr_scale: float = 1.0
    min_lr: float = 1e-6
    warmup_steps: int = 50
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0


@dataclass
class TrainConfig:
    """Length, logging, checkpointing and fault handling of a run."""

    steps: int = 300
    batch_size: int = 16  # per worker
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    eval_every: int = 0  # 0: evaluate only before and after training
    max_nonfinite: int = 5
    amp: bool = True  # bf16 autocast, used on CUDA only
    run_name: str = ""  # empty: glare-<timestamp>
    storage_path: str = "runs"


@dataclass
class EvalConfig:
    """The fast linear probe used as the tuning objective."""

    probe_steps: int = 300
    probe_lr: float = 1e-3
    probe_batch_size: int = 16
    last_blocks: int = 1
    img_size: int = 224  # the short side of the probe's images
    # false: keep the whole frame (short side to img_size, the long side by the set's aspect ratio);
    # true: centre-crop a square (a 2:1 frame loses half its pixels). Square sets give the same images.
    square_crop: bool = False
    seed: int = 0


@dataclass
class RayConfig:
    """Where and how wide to run."""

    address: str = ""  # empty: join the cluster we run in, else start a local one
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # < 1 packs several small workers (or sweep trials) on one GPU
    max_failures: int = 0
    # How Ray Train places the workers' bundles: PACK (fewest nodes), SPREAD (one per node where it
    # can), STRICT_SPREAD (one per node or wait for more nodes), STRICT_PACK (all on one node).
    placement_strategy: str = "PACK"
    # Seconds a (re)start may wait for the workers' resources, e.g. while the autoscaler replaces a
    # lost node; then the run stops with its last checkpoint intact. 0: wait as long as it takes.
    capacity_wait_s: float = 0.0


@dataclass
class GlareConfig:
    """The whole configuration of a GLARE run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def resolve_preset(path: str | Path, folder: Path = CONFIG_DIR, what: str = "config file",
                   error: type[ConfigError] = ConfigError) -> Path:
    """Find a preset by path, or by name inside ``folder`` (``configs/``; the sweeps use ``configs/sweeps/``)."""
    p = Path(path)
    for cand in (p, folder / p, folder / f"{p}.yaml"):
        if cand.is_file():
            return cand
    raise error(f"{what} not found: {path} (looked in . and {folder})")


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> GlareConfig:
    """Build a validated :class:`GlareConfig`.

    Args:
        path: a YAML file (or a preset name in ``configs/``) merged over the defaults.
        overrides: ``"section.key=value"`` strings merged last, e.g.
            ``"model.adapter.bottleneck=32"``.

    Raises:
        ConfigError: naming the offending key for unknown keys, wrong types and
            out-of-range values.
    """
    schema = OmegaConf.structured(GlareConfig)
    layers: list[DictConfig] = []
    try:
        if path is not None:
            preset = resolve_preset(path)
            layers.append(OmegaConf.load(preset))
        overrides = list(overrides)
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(overrides))
        merged = OmegaConf.merge(schema, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise omegaconf_error(err) from None
    assert isinstance(cfg, GlareConfig)
    validate(cfg)
    return cfg


def _schema_field(key: str) -> tuple[type | None, str | None]:
    """The dataclass that holds dotted ``key`` and the declared type of its last part (None where unknown)."""
    parts, owner = key.split("."), GlareConfig
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(owner)}
        if part not in fields:
            return owner, None
        if i == len(parts) - 1:
            return owner, str(fields[part].type)
        inner = getattr(owner(), part)
        if not dataclasses.is_dataclass(inner):
            return None, str(fields[part].type)
        owner = type(inner)
    return None, None


def omegaconf_error(err: OmegaConfBaseException) -> ConfigError:
    """One line for an OmegaConf merge error: the key, and what it expects (a known key or a type)."""
    import difflib

    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "")
    owner, expected = _schema_field(key) if key else (None, None)
    if owner is not None and expected is None:  # an unknown key
        known = [f.name for f in dataclasses.fields(owner)]
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
        hint = f"did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}? " if close else ""
        return ConfigError(f"config key {key!r}: unknown key ({hint}`python -m glare.train --help` lists every key)")
    msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    if expected is not None:
        return ConfigError(f"config key {key!r}: expected {expected} ({msg})")
    return ConfigError(f"config key {key!r}: {msg}" if key else msg)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {message}")


def _check_range(value: tuple[float, float] | list[float], key: str, lo: float, hi: float) -> None:
    _check(len(value) == 2, key, f"needs two values (low, high), got {list(value)}")
    _check(lo <= value[0] <= value[1] <= hi, key, f"needs {lo} <= low <= high <= {hi}, got {list(value)}")


def validate(cfg: GlareConfig) -> None:
    """Check ranges and cross-field rules; raise :class:`ConfigError` naming the key."""
    m, lo, r, a, d, o, t, e, ray = (
        cfg.model, cfg.loss, cfg.region, cfg.augment, cfg.data, cfg.optim, cfg.train, cfg.eval, cfg.ray,
    )
    _check(m.tune in ("adapters", "full"), "model.tune", f"must be 'adapters' or 'full', got {m.tune!r}")
    _check(m.adapter.bottleneck >= 1, "model.adapter.bottleneck", f"must be >= 1, got {m.adapter.bottleneck}")
    _check(m.adapter.first_block >= 0, "model.adapter.first_block", f"must be >= 0, got {m.adapter.first_block}")
    _check(m.img_size >= 8, "model.img_size", f"must be >= 8, got {m.img_size}")
    _check(m.global_token >= 0, "model.global_token", f"must be >= 0, got {m.global_token}")
    for head in ("head", "local_head"):
        for name in ("hidden_dim", "bottleneck_dim", "out_dim", "layers"):
            v = getattr(getattr(m, head), name)
            _check(v >= 1, f"model.{head}.{name}", f"must be >= 1, got {v}")
    _check(m.head_init in ("auto", "data", "random"), "model.head_init",
           f"must be 'auto', 'data' or 'random', got {m.head_init!r}")
    _check(m.head_init_images >= 2, "model.head_init_images", f"must be >= 2, got {m.head_init_images}")
    _check(0.0 <= m.momentum_start <= m.momentum_end <= 1.0, "model.momentum_start",
           f"needs 0 <= momentum_start <= momentum_end <= 1, got {m.momentum_start}, {m.momentum_end}")
    for name in ("glob", "reg", "loc1", "loc2"):
        v = getattr(lo, name)
        _check(v >= 0.0, f"loss.{name}", f"loss weights must be >= 0, got {v}")
    _check(lo.glob + lo.reg + lo.loc1 + lo.loc2 > 0, "loss", "at least one loss weight must be > 0")
    for name in ("student_temp", "teacher_temp_start", "teacher_temp"):
        v = getattr(lo, name)
        _check(v > 0.0, f"loss.{name}", f"temperatures must be > 0, got {v}")
    _check(lo.teacher_temp_warmup_steps >= 0, "loss.teacher_temp_warmup_steps", "must be >= 0")
    _check(0.0 <= lo.center_momentum < 1.0, "loss.center_momentum", f"must be in [0, 1), got {lo.center_momentum}")
    _check(r.num_regions >= 1, "region.num_regions", f"must be >= 1, got {r.num_regions}")
    _check(0.0 < r.top_q <= 1.0, "region.top_q", f"must be in (0, 1], got {r.top_q}")
    _check(r.correspondence in ("cross_attention", "geometric"), "region.correspondence",
           f"must be 'cross_attention' or 'geometric', got {r.correspondence!r}")
    _check(a.view_size >= 8, "augment.view_size", f"must be >= 8, got {a.view_size}")
    _check_range(a.crop_scale, "augment.crop_scale", 1e-3, 1.0)
    _check(0.0 <= a.min_overlap < 1.0, "augment.min_overlap", f"must be in [0, 1), got {a.min_overlap}")
    for name in ("flip_p", "jitter_p", "grayscale_p", "patch_fraction", "patch_noise_p", "patch_jitter_p"):
        v = getattr(a, name)
        _check(0.0 <= v <= 1.0, f"augment.{name}", f"must be in [0, 1], got {v}")
    for name in ("blur_p", "solarize_p"):
        v = getattr(a, name)
        _check(len(v) == 2 and all(0.0 <= p <= 1.0 for p in v), f"augment.{name}",
               f"needs one probability in [0, 1] per view, got {list(v)}")
    _check_range(a.blur_sigma, "augment.blur_sigma", 0.0, 100.0)
    _check(a.patch_noise_std >= 0.0, "augment.patch_noise_std", "must be >= 0")
    _check(d.base_size >= a.view_size, "data.base_size",
           f"must be >= augment.view_size ({a.view_size}), got {d.base_size}")
    _check(d.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0 (0: no shuffle), got {d.shuffle_buffer}")
    _check(d.mosaic.num_classes >= 2, "data.mosaic.num_classes", "must be >= 2")
    _check(d.materialize.lower() in MATERIALIZE_MODES, "data.materialize",
           f"must be 'auto', 'true' or 'false', got {d.materialize!r}")
    _check(0 <= d.seg_num_classes < 255, "data.seg_num_classes",
           f"must be in [0, 255) (0: count data.seg_class_names), got {d.seg_num_classes}")
    _check(not d.seg_class_names or d.seg_num_classes in (0, len(d.seg_class_names)), "data.seg_num_classes",
           f"is {d.seg_num_classes}, but data.seg_class_names lists {len(d.seg_class_names)} names")
    _check(len(set(d.seg_class_names)) == len(d.seg_class_names), "data.seg_class_names",
           f"names must be distinct, got {list(d.seg_class_names)}")
    _check(0 <= d.seg_ignore_index <= 65535, "data.seg_ignore_index",
           f"must be a mask value in [0, 65535], got {d.seg_ignore_index}")
    for name in ("seg_train_split", "seg_eval_split"):
        v = getattr(d, name)
        _check(bool(v.strip()) and "/" not in v, f"data.{name}", f"must name one split folder, got {v!r}")
    _check(d.seg_train_split != d.seg_eval_split, "data.seg_eval_split",
           f"must differ from data.seg_train_split (the probe would be scored on its own training images), "
           f"both are {d.seg_eval_split!r}")
    _check(d.mosaic.train >= 1 and d.mosaic.val >= 1, "data.mosaic", "train and val must be >= 1")
    _check(0.0 < o.lr < float("inf"), "optim.lr", f"must be > 0 and finite, got {o.lr}")
    _check(0.0 <= o.min_lr <= o.lr, "optim.min_lr", "must be in [0, optim.lr]")
    _check(o.head_lr_scale >= 0.0, "optim.head_lr_scale", f"must be >= 0 (0: frozen heads), got {o.head_lr_scale}")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(o.weight_decay >= 0.0 and o.weight_decay_end >= 0.0, "optim.weight_decay", "must be >= 0")
    _check(o.clip_grad >= 0.0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
    _check(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    _check(t.batch_size >= 2, "train.batch_size", f"must be >= 2, got {t.batch_size}")
    for name in ("log_every", "checkpoint_every"):
        _check(getattr(t, name) >= 1, f"train.{name}", "must be >= 1")
    _check(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    _check(t.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
    _check(e.probe_steps >= 1, "eval.probe_steps", "must be >= 1")
    _check(e.last_blocks >= 1, "eval.last_blocks", "must be >= 1")
    _check(e.probe_batch_size >= 2, "eval.probe_batch_size", "must be >= 2")
    _check(ray.num_workers >= 1, "ray.num_workers", f"must be >= 1, got {ray.num_workers}")
    _check(ray.cpus_per_worker > 0, "ray.cpus_per_worker", "must be > 0")
    _check(ray.gpus_per_worker > 0, "ray.gpus_per_worker", "must be > 0")
    _check(ray.max_failures >= -1, "ray.max_failures", "must be >= -1 (-1: retry forever)")
    _check(ray.capacity_wait_s >= 0, "ray.capacity_wait_s", f"must be >= 0 (0: no limit), got {ray.capacity_wait_s}")
    _check(ray.placement_strategy in PLACEMENT_STRATEGIES, "ray.placement_strategy",
           f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {ray.placement_strategy!r}")


def to_yaml(cfg: GlareConfig) -> str:
    """The resolved config as YAML (what every run saves as ``config.yaml``)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: GlareConfig) -> dict[str, Any]:
    """The config as plain nested dicts (for Ray, JSON and Tune)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> GlareConfig:
    """Rebuild a validated config from :func:`to_dict`'s output."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(GlareConfig), data))
    except OmegaConfBaseException as err:
        raise omegaconf_error(err) from None
    assert isinstance(cfg, GlareConfig)
    validate(cfg)
    return cfg
