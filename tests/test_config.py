"""Configuration: validated on load, one message naming the key and what is allowed."""

from pathlib import Path

import pytest

from ptychopv.config import Config, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ptychopv.yaml"


def _flat(d, path=""):
    out = {}
    for k, v in d.items():
        key = f"{path}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def test_the_example_lists_every_key_and_differs_only_where_it_says():
    """The example is the shipped model's beamline end to end (the loop runs on it as it is), so a
    few keys differ from the defaults; each of those lines says so."""
    import yaml

    cfg = load_config(EXAMPLE)
    ex, default = _flat(cfg.model_dump()), _flat(Config().model_dump())
    assert set(_flat(yaml.safe_load(EXAMPLE.read_text()))) >= set(default) - {"sim.replay"}   # every key written
    differ = {k for k in default if ex[k] != default[k]}
    assert differ == {"sim.geometry.detector_size", "sim.sample.size_px", "sim.probe.beam_m", "sim.probe.curvature",
                      "sim.scan.overlap", "sim.scan.extent_m", "sim.dose", "recon.beam_m", "recon.probe_curvature",
                      "train.loss_weight", "train.beam_px", "train.ignore_offset"}
    text = EXAMPLE.read_text()
    for key in ("detector_size: 64}  # default 128", "curvature: 4.0}              # defaults", "default 1e5",
                "probe_curvature: 4.0        # known defocus", "not a default", "size_px default 1024",
                "# defaults 0.5, 6 um", "beam_px: 8.517              # not a default"):
        assert key in text


@pytest.mark.parametrize("data, expect", [
    ({"sim": {"codec": "zip"}}, ["sim.codec", "'lz4'", "'zip'"]),
    ({"sim": {"codec": "jpeg"}}, ["sim", "codec jpeg needs dtype uint8 (sim.dtype is uint16)"]),
    ({"sim": {"geometry": {"detector_size": 100}}}, ["sim.geometry.detector_size", "128"]),
    ({"sim": {"scan": {"overlap": 1.0}}}, ["sim.scan.overlap", "less than 1"]),
    ({"sim": {"probe": {"kind": "gauss"}}}, ["sim.probe.kind", "'donut'"]),
    ({"epics": {"pva_server_port": -1}}, ["epics.pva_server_port", "greater than or equal to 1"]),
    ({"colour": 1}, ["colour: unknown key", "allowed keys:", "epics", "sim"]),
    ({"sim": {"scan": {"centre_m": [0, 0]}}}, ["sim.scan.centre_m: unknown key", "center_m"]),
    ({"prefix": ""}, ["prefix", "non-empty"]),
    ({"epics": {"pva_server_port": 5077}}, ["epics", "each port must be its own", "pva_server_port = image_pva_port"]),
    ({"access": {"write_hosts": ["10.0.0.0/24"]}}, ["access.write_hosts", "'10.0.0.0/24'", "plain host"]),
    ({"prefix": "AUD/X:"}, ["prefix", "'/'", "not allowed in an EPICS record name"]),
    ({"prefix": "BL99-" + "X" * 40 + ":"}, ["prefix", "46 characters: at most 27"]),
    ({"autosave": {"period_s": 1e-6}}, ["autosave.period_s", "greater than or equal to 0.5"]),
    ({"workflow": {"validate_engine": "onnxrunitme"}}, ["workflow.validate_engine", "'onnxrunitme'", "onnxruntime"]),
    ({"sim": {"sample": {"phase_image": "cameraa"}}}, ["sim.sample.phase_image", "'cameraa'", "camera"]),
    ({"sim": {"sample": {"amplitude_image": "mon"}}}, ["sim.sample.amplitude_image", "moon"]),
    ({"scaleout": {"consumers": [{"channel": "a", "prot": 1}]}},
     ["scaleout.consumers.0.prot: unknown key", "allowed keys: broadcast_port, channel, host, server_port"]),
    ({"scaleout": {"consumers": [{"channel": "a"}, {"channel": "b"}]}},
     ["scaleout.consumers.1.server_port 5079 is also scaleout.consumers.0.server_port on host 127.0.0.1"]),
    ({"scaleout": {"consumers": [{"channel": "a", "host": "localhost", "server_port": 5075}]}},
     ["scaleout.consumers.0.server_port 5075 is also epics.pva_server_port"]),
    ({"scaleout": {"consumers": [{"channel": "a", "server_port": 5085}]}},
     ["scaleout.mirror.server_port 5085 is also scaleout.consumers.0.server_port"]),
])
def test_bad_values_name_the_key(data, expect):
    with pytest.raises(ConfigError) as err:
        parse_config(data, "test.yaml")
    for text in expect:
        assert text in str(err.value)


def test_the_longest_prefix_allowed_leaves_every_record_name_within_epicss_limit():
    from ptychopv.config import NDARRAYPORT_BYTES, PREFIX_MAX
    from ptychopv.ioc import schema

    longest = max(len(n) for n in [r.name for r in schema.records()] + [p.name for p in schema.ntndarrays()])
    assert PREFIX_MAX + longest <= 60
    # and a stage's NDArrayPort (39 bytes) holds the prefix + its upstream's output
    assert PREFIX_MAX + max(len(st.serves) for st in schema.STAGES) <= NDARRAYPORT_BYTES
    assert parse_config({"prefix": "BL-7[a]<b>;c+d:" + "X" * (PREFIX_MAX - 15)}, "t").prefix


def test_servers_on_other_hosts_may_share_a_port():
    """The README's layout: each consumer on its own host, all on 5075 (the IOC's own port, on its host)."""
    cfg = parse_config({"scaleout": {"consumers": [{"channel": f"C{i}:Phase", "host": f"10.0.0.2{i}", "server_port": 5075}
                                                   for i in (1, 2)],
                                     "input_channel": "DET:Pva1:Image"}}, "test.yaml")
    assert [s[2] for s in cfg.scaleout.servers()] == [5075, 5075]
    assert parse_config({"workflow": {"validate_engine": "auto"}}, "t").workflow.validate_engine == "auto"


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


def test_the_simulators_codecs_are_the_ones_the_chain_decodes():
    """config.py may not import the NTNDArray module (p4p), so it names the codecs itself."""
    import typing

    from ptychopv.config import SimOptions
    from ptychopv.io.ntndarray import CODECS

    assert typing.get_args(SimOptions.model_fields["codec"].annotation) == CODECS
    for codec in CODECS:
        assert SimOptions(codec=codec, dtype="uint8").codec == codec


@pytest.mark.parametrize("scaleout, key", [
    ({"consumers": [{"channel": ""}]}, "scaleout.consumers.0.channel"),
    ({"consumers": [{"channel": "C1:Phase"}, {"channel": "C2 Phase", "server_port": 5080}]},
     "scaleout.consumers.1.channel"),
    ({"consumers": [{"channel": "C1:Phase"}], "mirror": {"channel": ""}}, "scaleout.mirror.channel"),
    ({"consumers": [{"channel": "C1:Phase"}], "input_channel": "13SIM1:Pva1:Image\n"}, "scaleout.input_channel"),
])
def test_scale_out_channels_are_refused_on_load_not_at_start_up(scaleout, key):
    """A consumer's channel '' passed validation and the IOC's start-up then failed at the gatherer's
    subscription (p4p: 'Empty channel name', exit 1 with a traceback); the others went to the
    pvaPy servers' command lines as they were."""
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ": .*PVA channel name"):
        parse_config({"scaleout": scaleout})


def test_a_config_that_is_not_utf8_is_refused_naming_the_file(tmp_path, capsys):
    """A config saved by an editor in Latin-1 (a comment with 'µm') ended `ptychopv ioc` with a
    UnicodeDecodeError traceback that named no file, exit 1; it is a config error: one line naming
    the file, exit 2."""
    from ptychopv.cli import main

    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("# beam 0.5 \u00b5m\nprefix: 'PTY:'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml"):
        load_config(bad)
    assert main(["ioc", "--config", str(bad)]) == 2
    assert "latin1.yaml" in capsys.readouterr().err
