"""The typed config: presets, overrides and the errors that name the key (issue: foundation)."""

from __future__ import annotations

import pytest

from glare.config import ConfigError, GlareConfig, from_dict, load_config, resolve_preset, to_dict, to_yaml


def test_defaults_presets_and_overrides_merge_in_order():
    cfg = load_config()
    assert isinstance(cfg, GlareConfig)
    assert (cfg.model.head.hidden_dim, cfg.model.head.out_dim) == (2048, 4096)
    assert (cfg.model.local_head.hidden_dim, cfg.model.local_head.out_dim) == (512, 2048)
    assert cfg.model.adapter.first_block == 0  # the paper's setting: an adapter in every block
    tiny = load_config("tiny", ["model.local_head.out_dim=32", "loss.reg=0.5"])
    assert tiny.model.local_head.out_dim == 32 and tiny.model.local_head.hidden_dim == 64  # override over preset
    assert tiny.loss.reg == 0.5 and tiny.loss.glob == 1.0
    assert resolve_preset("tiny").name == "tiny.yaml"


def test_yaml_and_dict_round_trip():
    cfg = load_config("tiny", ["model.adapter.first_block=1"])
    assert from_dict(to_dict(cfg)) == cfg
    assert "first_block: 1" in to_yaml(cfg)


@pytest.mark.parametrize(("override", "key"), [
    ("model.local_head.hidden_dim=0", "model.local_head.hidden_dim"),
    ("model.head.layers=0", "model.head.layers"),
    ("model.adapter.first_block=-1", "model.adapter.first_block"),
    ("model.adapter.bottleneck=0", "model.adapter.bottleneck"),
    ("loss.loc2=-1", "loss.loc2"),
    ("model.nope=1", "nope"),
    ("model.adapter.first_block=late", "model.adapter.first_block"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_preset_and_malformed_override():
    with pytest.raises(ConfigError, match="config file not found: nope"):
        load_config("nope")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["model.arch"])
