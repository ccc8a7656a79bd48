"""The sweep's own settings and its search space: a typed preset from ``configs/sweeps/``.

A sweep has two configurations. Every trial starts from a base
:class:`~glare.config.GlareConfig` (``--config`` and ``key=value``, as in
``glare.train``); :class:`SweepConfig` (``--sweep`` and ``sweep.key=value``)
says how the sweep runs: trials, scheduler, resources and the search space.
Each searched key is a GlareConfig dot-key (``loss.reg``); an index picks one
end of a pair (``augment.blur_sigma.1``). Its type (int, float, other)
follows from the config, so a range becomes the matching Optuna distribution.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from glare.config import CONFIG_DIR, ConfigError, GlareConfig, from_dict, load_config, resolve_preset, to_dict
from glare.preflight import check_model_rules

SWEEP_DIR = CONFIG_DIR / "sweeps"
RANGE_FIELDS = ("low", "high", "log", "step", "choices")
TRIAL_PREFIX = "trial_"  # each trial's folder in the sweep directory: trial_<id>
RUN_NAME = "train"  # each trial's training run: trial_<id>/train


class SweepConfigError(ConfigError):
    """A sweep setting or search-space entry is unknown, of the wrong type or out of range."""


@dataclass
class ParamRange:
    """One searched key: ``[low, high]`` (log-uniform with ``log``, on a grid with ``step``) or ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None


def default_space() -> dict[str, ParamRange | None]:
    """GLARE's hyper-parameters, with ranges around the paper's setting (ViT-S/14, 6 heads)."""
    return {
        "loss.glob": ParamRange(0.25, 2.0),
        "loss.reg": ParamRange(0.0, 2.0),
        "loss.loc1": ParamRange(0.0, 2.0),
        "loss.loc2": ParamRange(0.0, 2.0),
        "region.num_regions": ParamRange(2, 6),
        "region.top_q": ParamRange(0.05, 0.4),
        "augment.blur_sigma.1": ParamRange(1.5, 5.0),  # the strongest patch blur
        "augment.patch_fraction": ParamRange(0.1, 0.6),
        "model.adapter.bottleneck": ParamRange(16, 128, log=True),
        # Per 256 images. The main job's 0.02 (fixed heads, sharp teacher) sits in the middle of the
        # log range; below ~5e-3 the adapters barely move in 80 steps.
        "optim.lr": ParamRange(2e-3, 0.2, log=True),
        "model.momentum_start": ParamRange(0.99, 0.9995),
    }


@dataclass
class SchedulerConfig:
    """ASHA over training steps; its rungs (grace_period * reduction_factor**k) must be evaluation steps."""

    enabled: bool = True
    grace_period: int = 0  # steps before a trial may be stopped; 0: train.eval_every
    max_t: int = 0  # 0: train.steps
    reduction_factor: float = 2.0


@dataclass
class ResourceConfig:
    """What one trial holds besides its training workers (``ray.num_workers`` x ``ray.cpus_per_worker``)."""

    trial_cpus: float = 0.5  # the trial actor, which drives the TorchTrainer
    data_cpus: float = 1.0  # left free per trial for Ray Data's tasks (without it small clusters deadlock)
    max_concurrent: int = 0  # 0: as many trials as the cluster's CPUs and GPUs hold


@dataclass
class SweepConfig:
    """How a sweep runs; its directory is ``storage_path/name``."""

    name: str = "glare-sweep"
    storage_path: str = "runs/sweeps"
    base_config: str = "default"  # the trials' GlareConfig preset (``--config`` replaces it)
    overrides: list[str] = field(default_factory=list)  # key=value applied to the base config
    num_samples: int = 20
    metric: str = "miou"
    mode: str = "max"
    sampler: str = "tpe"  # or "random"
    seed: int = 0
    evaluate_base_first: bool = True  # the base config's values are the first point
    # Further points evaluated next, e.g. settings known from earlier sweeps; a key left out keeps its base
    # value. Like sampled points, one that is invalid in combination becomes an INVALID trial.
    points: list[dict[str, Any]] = field(default_factory=list)
    max_failures: int = 1  # retries of a failed trial (ray.max_failures: restarts inside one training)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    space: dict[str, ParamRange | None] = field(default_factory=default_space)  # null drops a key

    def params(self) -> dict[str, ParamRange]:
        """The searched keys (those not set to null)."""
        return {k: v for k, v in self.space.items() if v is not None}


def _parse_value(text: str) -> Any:
    """A YAML scalar or list, the way OmegaConf reads ``key=value``."""
    return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]


def _child(node: dict[str, Any], key: str, item: str) -> dict[str, Any]:
    child = node.setdefault(key, {})
    if not isinstance(child, dict):
        raise SweepConfigError(f"override {item!r} sets a field of {key!r}, which an earlier override set to {child!r}")
    return child


def _override_layer(overrides: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings as nested dicts; ``space.<dot-key>.<field>`` keeps the dotted key whole."""
    layer: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SweepConfigError(f"override {item!r} is not of the form key=value")
        value = _parse_value(text)
        if key.startswith("space."):
            param, _, last = key[len("space."):].rpartition(".")
            if last in RANGE_FIELDS and param:
                _child(_child(layer, "space", item), param, item)[last] = value
            else:
                _child(layer, "space", item)[key[len("space."):]] = value
            continue
        node = layer
        *parents, leaf = key.split(".")
        for part in parents:
            node = _child(node, part, item)
        node[leaf] = value
    return layer


def load_sweep(path: str | Path | None = None, overrides: Iterable[str] = ()) -> SweepConfig:
    """Build a :class:`SweepConfig` from the defaults, a preset (path or name in ``configs/sweeps/``) and overrides.

    Raises:
        SweepConfigError: naming the key, for unknown keys, wrong types and out-of-range settings.
    """
    try:
        layers = []
        if path is not None:
            layers.append(OmegaConf.load(resolve_preset(path, SWEEP_DIR, "sweep preset", SweepConfigError)))
        layers.append(OmegaConf.create(_override_layer(overrides)))
        sweep = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SweepConfig), *layers))
    except yaml.YAMLError as err:
        raise SweepConfigError(f"sweep preset {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or getattr(err, "key", None)
        msg = getattr(err, "msg", None) or str(err).splitlines()[0]
        raise SweepConfigError(f"sweep key {key!r}: {msg}") from None
    assert isinstance(sweep, SweepConfig)
    validate_sweep(sweep)
    return sweep


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise SweepConfigError(f"sweep key {key!r}: {message}")


def validate_sweep(sweep: SweepConfig) -> None:
    """Rules of the sweep settings alone (those that involve the base config are in :func:`check_sweep`)."""
    _check(bool(sweep.name) and "/" not in sweep.name, "name", f"must be a non-empty folder name, got {sweep.name!r}")
    _check("://" not in sweep.storage_path, "storage_path",
           f"must be a local or shared-filesystem path (the study is an SQLite file), got {sweep.storage_path!r}")
    _check(sweep.num_samples >= 1, "num_samples", f"must be >= 1, got {sweep.num_samples}")
    _check(bool(sweep.metric), "metric", "must be a reported metric, e.g. 'miou'")
    _check(sweep.mode in ("max", "min"), "mode", f"must be 'max' or 'min', got {sweep.mode!r}")
    _check(sweep.sampler in ("tpe", "random"), "sampler", f"must be 'tpe' or 'random', got {sweep.sampler!r}")
    _check(sweep.max_failures >= -1, "max_failures", "must be >= -1 (-1: retry forever)")
    s, r = sweep.scheduler, sweep.resources
    _check(s.grace_period >= 0, "scheduler.grace_period", f"must be >= 0, got {s.grace_period}")
    _check(s.max_t >= 0, "scheduler.max_t", f"must be >= 0, got {s.max_t}")
    _check(s.reduction_factor > 1, "scheduler.reduction_factor", f"must be > 1, got {s.reduction_factor}")
    _check(r.trial_cpus > 0, "resources.trial_cpus", f"must be > 0 (Ray needs some resource), got {r.trial_cpus}")
    _check(r.data_cpus >= 0, "resources.data_cpus", f"must be >= 0, got {r.data_cpus}")
    _check(r.max_concurrent >= 0, "resources.max_concurrent", f"must be >= 0, got {r.max_concurrent}")
    _check(bool(sweep.params()), "space", "searches no key")
    for key, rng in sweep.params().items():
        where = f"space.{key}"
        if rng.choices is not None:
            _check(len(rng.choices) >= 1, where, "choices must not be empty")
            _check(rng.low is None and rng.high is None and not rng.log and rng.step is None, where,
                   "give either choices or a range (low, high, log, step), not both")
            continue
        _check(rng.low is not None and rng.high is not None, where, "needs low and high (or choices)")
        _check(rng.low < rng.high, where, f"needs low < high, got {rng.low}, {rng.high}")
        _check(not rng.log or rng.low > 0, where, f"a log range needs low > 0, got {rng.low}")
        _check(rng.step is None or (rng.step > 0 and not rng.log), where, "step must be > 0, and not with log")


_ABSENT = object()


def get_value(cfg: GlareConfig, key: str) -> Any:
    """The value at a dot-key of ``cfg``; an integer part indexes a pair or list."""
    conf = OmegaConf.create(to_dict(cfg))
    value = OmegaConf.select(conf, key, default=_ABSENT)
    if value is _ABSENT:
        parts = key.split(".")
        missing = next(p for i, p in enumerate(parts)
                       if OmegaConf.select(conf, ".".join(parts[: i + 1]), default=_ABSENT) is _ABSENT)
        raise SweepConfigError(f"space key {key!r} is not a config key (no {missing!r})")
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def apply_point(cfg: GlareConfig, point: dict[str, Any]) -> GlareConfig:
    """A validated copy of ``cfg`` with the point's dot-keys set (raises :class:`ConfigError`)."""
    conf = OmegaConf.create(to_dict(cfg))  # pairs become lists, so one end can be replaced in place
    for key, value in point.items():
        get_value(cfg, key)  # names the key if it does not exist
        OmegaConf.update(conf, key, value, merge=False)
    return from_dict(OmegaConf.to_container(conf))


def trial_config(base: GlareConfig, point: dict[str, Any]) -> GlareConfig:
    """The config one trial trains: ``base`` with ``point`` applied, checked down to the model (ConfigError)."""
    cfg = apply_point(base, point)
    check_model_rules(cfg)
    return cfg


def point_error(base: GlareConfig, point: dict[str, Any]) -> str | None:
    """Why ``point`` is invalid on ``base``, or None."""
    try:
        trial_config(base, point)
    except ConfigError as err:
        return str(err)
    return None


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "other"


def base_point(sweep: SweepConfig, cfg: GlareConfig) -> dict[str, Any]:
    """The base config's value of every searched key (the first point evaluated)."""
    return {key: get_value(cfg, key) for key in sweep.params()}


def first_points(sweep: SweepConfig, cfg: GlareConfig) -> list[dict[str, Any]]:
    """The points evaluated before the sampler's own: the base point (if asked) then ``sweep.points``, completed."""
    base = base_point(sweep, cfg)
    points = [base] if sweep.evaluate_base_first else []
    for i, point in enumerate(sweep.points):
        for key, value in point.items():
            _check(key in base, f"points[{i}]", f"{key!r} is not a searched key")
            _check(_in_range(sweep.space[key], value), f"points[{i}]", f"{key}={value!r} lies outside its range")
        points.append({**base, **point})
    return points


def optuna_space(sweep: SweepConfig, cfg: GlareConfig) -> dict[str, Any]:
    """The search space as Optuna distributions, typed by the config field each key sets."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space: dict[str, Any] = {}
    for key, rng in sweep.params().items():
        kind = _kind(get_value(cfg, key))
        if rng.choices is not None:
            space[key] = CategoricalDistribution(list(rng.choices))
        elif kind == "int":
            for name in ("low", "high", "step"):
                v = getattr(rng, name)
                _check(v is None or float(v).is_integer(), f"space.{key}", f"{name} must be an integer, got {v}")
            space[key] = IntDistribution(int(rng.low), int(rng.high), log=rng.log, step=int(rng.step or 1))
        elif kind == "float":
            space[key] = FloatDistribution(float(rng.low), float(rng.high), log=rng.log, step=rng.step)
        else:
            raise SweepConfigError(f"sweep key 'space.{key}': a {type(get_value(cfg, key)).__name__} setting "
                                   "needs choices, not a range")
    return space


def _in_range(rng: ParamRange, value: Any) -> bool:
    if rng.choices is not None:
        return value in rng.choices
    return isinstance(value, (int, float)) and rng.low - 1e-12 <= value <= rng.high + 1e-12


def check_sweep(sweep: SweepConfig, cfg: GlareConfig) -> None:
    """Check the sweep against its base config before anything starts (raises :class:`SweepConfigError`).

    The base config must be valid, every searched key must exist, each end of
    its range (or each choice) must be valid on the base config, the
    scheduler's rungs must fall on evaluation steps, and the first points
    (the base values with ``evaluate_base_first``, ``points``) must lie in range.
    Points that are invalid only in combination become invalid trials instead.
    """
    err = point_error(cfg, {})
    _check(err is None, "base_config", f"the base config is not valid: {err}")
    space = optuna_space(sweep, cfg)  # also names keys that do not exist
    for key, rng in sweep.params().items():
        dist = space[key]
        ends = rng.choices if rng.choices is not None else [dist.low, dist.high]
        for value in ends:
            err = point_error(cfg, {key: value})
            _check(err is None, f"space.{key}", f"{value!r} is not valid for the base config: {err}")
    if sweep.evaluate_base_first:
        for key, value in base_point(sweep, cfg).items():
            _check(_in_range(sweep.space[key], value), f"space.{key}",
                   f"the base config's value {value!r} lies outside the range; widen it or set "
                   "evaluate_base_first: false")
    first_points(sweep, cfg)  # names points with unknown keys or values out of range
    s = sweep.scheduler
    if s.enabled:
        every = cfg.train.eval_every
        _check(every > 0, "scheduler.enabled",
               "ASHA needs evaluations during training: set train.eval_every, or scheduler.enabled: false")
        grace = s.grace_period or every
        _check(grace % every == 0, "scheduler.grace_period",
               f"must be a multiple of train.eval_every ({every}) so that each rung is an evaluation, got {grace}")
        _check(float(s.reduction_factor).is_integer(), "scheduler.reduction_factor",
               f"must be a whole number so that each rung is an evaluation, got {s.reduction_factor}")
        max_t = s.max_t or cfg.train.steps
        _check(grace < max_t, "scheduler.grace_period",
               f"must be below max_t ({max_t} steps), else no trial can be stopped early; got {grace}")
        if "train.steps" in sweep.params():  # a trial that ends before max_t is finished, not stopped
            rng = sweep.params()["train.steps"]
            most = int(max(rng.choices) if rng.choices is not None else rng.high)
            _check(most <= max_t, "space.train.steps",
                   f"trials of up to {most} steps need scheduler.max_t >= {most} (it is {max_t}); "
                   "set scheduler.max_t or the base config's train.steps")


def scheduler_bounds(sweep: SweepConfig, cfg: GlareConfig) -> tuple[int, int]:
    """ASHA's (grace_period, max_t) in steps, with their defaults resolved."""
    return sweep.scheduler.grace_period or cfg.train.eval_every, sweep.scheduler.max_t or cfg.train.steps


def sweep_base_config(sweep: SweepConfig, preset: str | None = None, overrides: Iterable[str] = ()) -> GlareConfig:
    """The trials' base config: ``preset`` (else ``sweep.base_config``), then the sweep's and these overrides."""
    return load_config(preset or sweep.base_config, [*sweep.overrides, *overrides])


def to_yaml(sweep: SweepConfig) -> str:
    """The resolved sweep settings as YAML."""
    return OmegaConf.to_yaml(OmegaConf.structured(sweep))

