"""Starting or joining Ray, the one way ``python -m glare.train`` and ``tune/sweep.py`` both use."""

from __future__ import annotations

import os

from glare.config import GlareConfig

# Ray Train's limit on how long a worker group may wait for its resources before the try counts as failed.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def init_ray(cfg: GlareConfig, verbose: bool = False, *, num_cpus: int | None = None,
             env_vars: dict[str, str] | None = None, dashboard_port: int | None = None) -> None:
    """Join ``ray.address`` / the cluster this job runs in, or start a local instance (nothing if Ray is up).

    Locally, Ray gets ``num_cpus`` (default: the machine's CPUs, or the workers' CPUs plus one for Ray
    Data's decoding if more), ``env_vars`` in the job's runtime env and ``dashboard_port``. Unless
    ``verbose``, the workers' output is not forwarded and Ray logs warnings only (:mod:`glare.console`
    shows the run's progress from its metrics.jsonl instead).
    """
    import ray

    from glare.console import quiet_ray_data, ray_init_kwargs

    if ray.is_initialized():
        return
    kwargs = ray_init_kwargs(verbose)
    # The job's runtime env reaches Ray Train's controller actor wherever it runs.
    env = {START_TIMEOUT_ENV: str(cfg.ray.capacity_wait_s)} if cfg.ray.capacity_wait_s else {}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, **kwargs)
    else:
        env.update(env_vars or {})
        if num_cpus is None:
            # Ray Data's decode stage and the train workers share the CPUs; give the workers what
            # they ask for plus one CPU for data so neither starves the other.
            num_cpus = max(os.cpu_count() or 1, int(cfg.ray.num_workers * cfg.ray.cpus_per_worker + 0.999) + 1)
        if dashboard_port is not None:
            kwargs["dashboard_port"] = dashboard_port
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env} if env else None, **kwargs)
    quiet_ray_data(verbose)
