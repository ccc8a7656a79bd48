"""The cluster launcher YAMLs pass Ray's own config checks and keep the invariants GLARE relies on.

No cloud is reachable here, so each config goes through the offline part of what `ray up` does
(``ray.autoscaler._private.commands._bootstrap_config``): ``prepare_config`` (defaults, on-prem node
type, setup-command merge, per-type worker bounds) then ``validate_config`` (Ray's JSON schema and
cross-field checks). The provider's ``bootstrap_config`` (AWS API calls) is left out.
"""

import copy
import re
from collections.abc import Callable
from importlib.metadata import metadata
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.commands import warn_about_bad_start_command
from ray.autoscaler._private.local.config import LOCAL_CLUSTER_NODE_TYPE
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
AUTOSCALING_FLAG = "--autoscaling-config=~/ray_bootstrap_config.yaml"
INSTALL = re.compile(r'pip install (?:-\S+ )*-e "\$HOME/glare\[([\w,]+)\]"')
RAY_PIN = re.compile(r'"ray\[[\w,]*default[\w,]*\]==([\w.]+)"')

Config = dict[str, Any]


def load(name: str) -> Config:
    """The raw YAML of cluster/<name>.yaml, as `ray up` reads it."""
    return yaml.safe_load((CLUSTER / f"{name}.yaml").read_text())


def validated(config: Config) -> Config:
    """Run Ray's offline config pipeline on a copy; return the prepared config or raise Ray's error."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def worker_types(prepared: Config) -> dict[str, Config]:
    """The node types the autoscaler may launch as workers."""
    return {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}


def test_aws_yaml_passes_ray_validation() -> None:
    prepared = validated(load("aws"))
    assert prepared["head_node_type"] == "head_cpu"
    # Ray filled the head's bound itself: the head never counts as a worker.
    assert prepared["available_node_types"]["head_cpu"]["max_workers"] == 0


def test_aws_gpu_workers_scale_from_zero() -> None:
    prepared = validated(load("aws"))
    workers = worker_types(prepared)
    assert set(workers) == {"gpu_1x", "gpu_1x_spot", "gpu_4x"}
    for name, node in workers.items():
        assert node["min_workers"] == 0, name
        assert node["resources"]["GPU"] >= 1, name
        assert node["max_workers"] <= prepared["max_workers"], f"{name}: per-type cap above the global cap"
    assert {node["resources"]["GPU"] for node in workers.values()} == {1, 4}
    assert workers["gpu_1x"]["max_workers"] >= 1  # the default single-GPU type is enabled


def test_aws_spot_type_mirrors_on_demand() -> None:
    types = validated(load("aws"))["available_node_types"]
    spot = {
        k for k, v in types.items() if v["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    }
    assert spot == {"gpu_1x_spot"}
    twin, spot_node = types["gpu_1x"], types["gpu_1x_spot"]
    assert spot_node["resources"] == twin["resources"]
    assert spot_node["node_config"]["InstanceType"] == twin["node_config"]["InstanceType"]


def test_aws_head_has_no_gpu() -> None:
    prepared = validated(load("aws"))
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert head["resources"]["CPU"] >= 1  # Tune drivers need CPU slots on the head
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))  # not an EC2 GPU family


def test_aws_nodes_share_one_image() -> None:
    # Ray needs one Python minor version across nodes; one AMI for all node types guarantees it.
    images = {v["node_config"]["ImageId"] for v in validated(load("aws"))["available_node_types"].values()}
    assert len(images) == 1


@pytest.mark.parametrize("name", ["aws", "onprem"])
def test_setup_installs_the_checked_out_project(name: str) -> None:
    prepared = validated(load(name))
    assert (REPO / prepared["file_mounts"]["~/glare"]).resolve() == REPO
    assert ".venv" in prepared["rsync_exclude"]
    extras = metadata("glare").get_all("Provides-Extra")  # from pyproject.toml, via the editable install
    # prepare_config merged setup_commands into both of these; each must install the project.
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [m for cmd in prepared[key] if (m := INSTALL.search(cmd))]
        assert len(installs) == 1, f"{name}: {key} should install ~/glare exactly once"
        wanted = installs[0].group(1).split(",")
        assert set(wanted) == {"mmseg", "imgfocus"}
        assert set(wanted) <= set(extras), f"extras {wanted} not all in pyproject's {extras}"


@pytest.mark.parametrize("name", ["aws", "onprem"])
def test_cluster_ray_is_pinned_to_the_projects(name: str) -> None:
    # Every node, including a worker added days after the head, must run the Ray that validated
    # this YAML (the project's pinned Ray).
    pins = {m.group(1) for cmd in load(name)["setup_commands"] if (m := RAY_PIN.search(cmd))}
    assert pins == {ray.__version__}


def test_onprem_setup_matches_aws() -> None:
    assert load("onprem")["setup_commands"] == load("aws")["setup_commands"]


@pytest.mark.parametrize("name", ["aws", "onprem"])
def test_start_commands(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    prepared = validated(load(name))
    head = " ".join(prepared["head_start_ray_commands"])
    assert AUTOSCALING_FLAG in head
    assert "--dashboard-host=127.0.0.1" in head
    assert "$RAY_HEAD_IP:6379" in " ".join(prepared["worker_start_ray_commands"])
    capsys.readouterr()
    warn_about_bad_start_command(prepared["head_start_ray_commands"])
    assert "autoscaling-config" not in "".join(capsys.readouterr())


def test_ray_warns_when_autoscaling_flag_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    # The check above would pass vacuously if Ray never printed this warning.
    commands = [cmd.replace(AUTOSCALING_FLAG, "") for cmd in load("onprem")["head_start_ray_commands"]]
    capsys.readouterr()
    warn_about_bad_start_command(commands)
    assert "will not launch any workers" in "".join(capsys.readouterr())


def test_onprem_keeps_every_listed_worker() -> None:
    raw = load("onprem")
    prepared = validated(raw)
    # prepare_config replaced the YAML's (absent) node types with Ray's single on-prem type.
    assert list(prepared["available_node_types"]) == [LOCAL_CLUSTER_NODE_TYPE]
    node = prepared["available_node_types"][LOCAL_CLUSTER_NODE_TYPE]
    hosts = len(raw["provider"]["worker_ips"])
    assert hosts >= 1
    assert (node["min_workers"], node["max_workers"], prepared["max_workers"]) == (hosts, hosts, hosts)
    assert raw["auth"]["ssh_user"] and raw["auth"]["ssh_private_key"]


def _set(path: tuple[str, ...], value: Any) -> Callable[[Config], None]:
    """A mutation that sets config[path...] = value."""

    def mutate(config: Config) -> None:
        for key in path[:-1]:
            config = config[key]
        config[path[-1]] = value

    return mutate


def _drop(path: tuple[str, ...]) -> Callable[[Config], None]:
    """A mutation that deletes config[path...]."""

    def mutate(config: Config) -> None:
        for key in path[:-1]:
            config = config[key]
        del config[path[-1]]

    return mutate


BROKEN = [
    ("aws", _set(("max_worker",), 3), jsonschema.ValidationError, "'max_worker' was unexpected"),
    (
        "aws",
        _set(("available_node_types", "gpu_1x", "resources", "GPU"), 0.5),
        jsonschema.ValidationError,
        "0.5 is not of type 'integer'",
    ),
    ("aws", _set(("available_node_types", "gpu_1x", "min_workers"), 9), ValueError, "smaller than the sum"),
    ("aws", _set(("head_node_type",), "gpu_8x"), ValueError, "`head_node_type` must be one of"),
    ("aws", _drop(("provider",)), KeyError, "provider"),
    ("onprem", _set(("bogus_key",), True), jsonschema.ValidationError, "'bogus_key' was unexpected"),
    ("onprem", _drop(("provider", "worker_ips")), click.ClickException, "list of `worker_ips`"),
    ("onprem", _set(("available_node_types",), {"x": {}}), click.ClickException, "not supported for on-premise"),
]


@pytest.mark.parametrize(("name", "mutate", "error", "message"), BROKEN)
def test_broken_yaml_fails_validation(
    name: str, mutate: Callable[[Config], None], error: type[Exception], message: str
) -> None:
    config = load(name)
    mutate(config)
    with pytest.raises(error, match=re.escape(message)):
        validated(config)


# --- The requests our code makes fit the node types the YAMLs declare ---------------------------------

def schedulable_types(prepared: Config) -> dict[str, dict[str, float]]:
    """Each node type that can exist (the head, or a worker type with max_workers > 0) -> its resources."""
    head = prepared["head_node_type"]
    return {k: v["resources"] for k, v in prepared["available_node_types"].items()
            if k == head or v.get("max_workers", 0) > 0}


def fits(request: dict[str, float], resources: dict[str, float]) -> bool:
    return all(resources.get(key, 0) >= amount for key, amount in request.items() if amount)


def unschedulable(prepared: Config, cfg: Any) -> list[str]:
    """What GLARE's training (``cfg``) and the sweep would ask for that no node type of ``prepared`` holds."""
    from glare.engine.driver import worker_resources
    from tune.space import SweepConfig

    types = schedulable_types(prepared)
    bundle = worker_resources(cfg)
    requests = {
        "a training worker": bundle,
        "a sweep trial's actor": {"CPU": SweepConfig().resources.trial_cpus},
        "a Ray Data task": {"CPU": 1.0},  # Ray Data's map tasks ask for one CPU by default
    }
    if cfg.ray.placement_strategy == "STRICT_PACK":
        requests["all workers on one node"] = {k: v * cfg.ray.num_workers for k, v in bundle.items()}
    return [f"{what} {req}" for what, req in requests.items() if not any(fits(req, r) for r in types.values())]


# The main job and the README's cluster commands (cluster/README.md: "one 4-GPU training run").
RUNS = [("default", []), ("default", ["ray.num_workers=4", "ray.use_gpu=true"]),
        ("tiny", ["ray.num_workers=2", "ray.use_gpu=true", "ray.gpus_per_worker=0.5"]),
        ("default", ["ray.num_workers=4", "ray.use_gpu=true", "ray.placement_strategy=STRICT_PACK"])]


@pytest.mark.parametrize(("preset", "overrides"), RUNS)
def test_aws_node_types_hold_what_glare_asks_for(preset: str, overrides: list[str]) -> None:
    from glare.config import load_config

    assert unschedulable(validated(load("aws")), load_config(preset, overrides)) == []


def test_a_node_type_too_small_for_the_workers_is_caught() -> None:
    # The check above must be able to fail: GPU workers asking for more CPUs than any GPU node has.
    from glare.config import load_config

    cfg = load_config("default", ["ray.use_gpu=true", "ray.cpus_per_worker=64"])
    missing = unschedulable(validated(load("aws")), cfg)
    assert missing == ["a training worker {'CPU': 64.0, 'GPU': 1.0}"]
    config = load("aws")
    config["available_node_types"]["head_cpu"]["resources"]["CPU"] = 0  # no CPU left for a trial's actor
    for name in ("gpu_1x", "gpu_1x_spot", "gpu_4x"):
        config["available_node_types"][name]["max_workers"] = 0
    missing = unschedulable(validated(config), load_config("default"))
    assert [m.split(" {")[0] for m in missing] == ["a training worker", "a sweep trial's actor", "a Ray Data task"]
