"""Configuration: validated on load, one message naming the key and what is allowed."""

from pathlib import Path

import pytest

from ptychopv.config import Config, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ptychopv.yaml"


def test_the_example_is_valid_and_equals_the_defaults():
    cfg = load_config(EXAMPLE)
    assert cfg.model_dump() == Config().model_dump()


@pytest.mark.parametrize("data, expect", [
    ({"sim": {"codec": "zip"}}, ["sim.codec", "'lz4'", "'zip'"]),
    ({"sim": {"geometry": {"detector_size": 100}}}, ["sim.geometry.detector_size", "128"]),
    ({"sim": {"scan": {"overlap": 1.0}}}, ["sim.scan.overlap", "less than 1"]),
    ({"sim": {"probe": {"kind": "gauss"}}}, ["sim.probe.kind", "'donut'"]),
    ({"epics": {"pva_server_port": -1}}, ["epics.pva_server_port", "greater than or equal to 1"]),
    ({"colour": 1}, ["colour: unknown key", "allowed keys:", "epics", "sim"]),
    ({"sim": {"scan": {"centre_m": [0, 0]}}}, ["sim.scan.centre_m: unknown key", "center_m"]),
    ({"prefix": ""}, ["prefix", "non-empty"]),
])
def test_bad_values_name_the_key(data, expect):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.yaml")
    for text in expect:
        assert text in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("sim: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_relative_paths_are_relative_to_the_file(tmp_path):
    from ptychopv.config import resolve

    (tmp_path / "c.yaml").write_text("autosave: {directory: here}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert resolve(cfg, cfg.autosave.directory) == tmp_path / "here"
