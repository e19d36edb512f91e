"""Model registry: publish/list/get, versions only grow, hash refusal, concurrent processes."""

import json
import multiprocessing as mp
import time

import pytest
from ptychopv.inference.registry import CARD, ONNX, ModelRegistry, RegistryError

CARD_FIELDS = {"model": "ptychonn2", "input_shape": [1, 64, 64], "outputs": ["phase"],
               "preprocessing": {"transform": "log1p", "divisor": 7.0}, "val_loss": 0.1}


def fake_onnx(path, payload: bytes = b"onnx"):
    # The registry stores bytes; it never parses the model, so any content will do here.
    path.write_bytes(payload * 1000)
    return path


def test_publish_list_latest_get(tmp_path):
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.versions() == [] and reg.latest() is None
    v1 = reg.publish(fake_onnx(tmp_path / "a.onnx", b"a"), CARD_FIELDS)
    v2 = reg.publish(fake_onnx(tmp_path / "b.onnx", b"b"), dict(CARD_FIELDS, parent=1),
                     weights_path=fake_onnx(tmp_path / "w.pt", b"w"))
    assert (v1.version, v2.version) == (1, 2)
    assert reg.versions() == [1, 2]
    assert [c["version"] for c in reg.list()] == [1, 2]
    latest = reg.latest()
    assert latest.version == 2 and latest.card["parent"] == 1
    assert latest.onnx_path.read_bytes() == b"b" * 1000
    assert latest.weights_path.name == "weights.pt"
    assert set(latest.card["files"]) == {"model.onnx", "weights.pt"}
    assert reg.get(1).card["sha256"] == v1.card["sha256"] != v2.card["sha256"]
    assert reg.get("v0001").version == reg.get("1").version == 1
    assert (tmp_path / "reg" / "v0002" / CARD).is_file()
    assert reg.get(1).weights_path is None
    src = latest.source()
    assert (src.input_size, src.outputs, src.version) == (64, ("phase",), 2)
    assert not [p for p in (tmp_path / "reg").iterdir() if p.name.startswith(".")]
    assert (latest.path.stat().st_mode & 0o777) == 0o755  # readable by the IOC's user


def test_versions_only_grow_and_published_files_are_copies(tmp_path):
    reg = ModelRegistry(tmp_path)
    src = fake_onnx(tmp_path / "m.onnx", b"x")
    for _ in range(3):
        reg.publish(src, CARD_FIELDS)
    src.write_bytes(b"changed")  # the registry holds its own copy
    assert reg.versions() == [1, 2, 3]
    assert reg.get(3).onnx_path.read_bytes() == b"x" * 1000


def test_tampered_or_truncated_file_is_refused(tmp_path):
    reg = ModelRegistry(tmp_path)
    v = reg.publish(fake_onnx(tmp_path / "m.onnx"), CARD_FIELDS)
    data = v.onnx_path.read_bytes()
    v.onnx_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RegistryError, match="model.onnx has sha256 .* refusing"):
        reg.get(1)
    with pytest.raises(RegistryError, match="refusing"):
        reg.latest()
    assert reg.get(1, verify=False).version == 1  # listing still works
    v.onnx_path.unlink()
    with pytest.raises(RegistryError, match="model.onnx is missing"):
        reg.get(1)


def test_bad_card_and_bad_requests(tmp_path):
    reg = ModelRegistry(tmp_path)
    onnx = fake_onnx(tmp_path / "m.onnx")
    with pytest.raises(RegistryError, match="set by the registry"):
        reg.publish(onnx, dict(CARD_FIELDS, version=7))
    with pytest.raises(RegistryError, match="lacks 'input_shape'"):
        reg.publish(onnx, {"model": "ptychonn2", "outputs": ["phase"]})
    with pytest.raises(RegistryError, match="parent version 4 is not in"):
        reg.publish(onnx, dict(CARD_FIELDS, parent=4))
    with pytest.raises(RegistryError, match="does not exist"):
        reg.publish(tmp_path / "nope.onnx", CARD_FIELDS)
    with pytest.raises(RegistryError, match="has no versions"):
        reg.get("latest")
    reg.publish(onnx, CARD_FIELDS)
    with pytest.raises(RegistryError, match=r"version 9 not found .*have: \[1\]"):
        reg.get(9)
    with pytest.raises(TypeError, match="version must be an int"):
        reg.get(1.5)
    (tmp_path / "v0001" / CARD).write_text("{not json")
    with pytest.raises(RegistryError, match="not valid JSON"):
        reg.get(1)
    with pytest.raises(RegistryError, match="does not exist"):
        ModelRegistry(tmp_path / "missing", create=False)


def test_leftover_temporary_folder_is_not_a_version(tmp_path):
    reg = ModelRegistry(tmp_path)
    (tmp_path / ".publish-crashed").mkdir()
    (tmp_path / ".publish-crashed" / ONNX).write_bytes(b"half")
    assert reg.versions() == []
    assert reg.publish(fake_onnx(tmp_path / "m.onnx"), CARD_FIELDS).version == 1


def test_versions_stay_within_the_32_bit_records_that_show_them(tmp_path, caplog):
    """Helper 19: a folder v2147483648 (by hand, a copy) became the newest version, and
    ModelVersion_RBV / Model:Latest_RBV (32-bit longin) wrapped to a negative number. It is not a
    version (said once in the log); the last 32-bit number is the registry's last."""
    reg = ModelRegistry(tmp_path)
    reg.publish(fake_onnx(tmp_path / "m.onnx"), CARD_FIELDS)
    (tmp_path / f"v{2**31}").mkdir()
    (tmp_path / "v\u0661\u0662\u0663\u0664").mkdir()     # digits of another script: not a version
    with caplog.at_level("WARNING"):
        assert reg.versions() == [1] and reg.latest().version == 1
        assert reg.versions() == [1]
    assert sum(f"v{2**31} ignored" in r.getMessage() for r in caplog.records) == 1
    assert reg.publish(fake_onnx(tmp_path / "m.onnx"), CARD_FIELDS).version == 2
    (tmp_path / f"v{2**31 - 1}").mkdir()
    assert reg.versions()[-1] == 2**31 - 1
    with pytest.raises(RegistryError, match="is full: versions go up to 2147483647"):
        reg.publish(fake_onnx(tmp_path / "m.onnx"), CARD_FIELDS)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".publish")]


def test_a_version_folder_without_a_card_says_so(tmp_path):
    """Helper 19: an empty v0002 read "version 2 not found (have: [1, 2])", which contradicts itself."""
    reg = ModelRegistry(tmp_path)
    reg.publish(fake_onnx(tmp_path / "m.onnx"), CARD_FIELDS)
    (tmp_path / "v0002").mkdir()
    with pytest.raises(RegistryError, match=r"v0002 has no card.json \(not published by the registry, or emptied\)"):
        reg.get(2)
    with pytest.raises(RegistryError, match=r"version 5 not found .*have: \[1, 2\]"):
        reg.get(5)


def _writer(root, src, count, barrier):
    reg = ModelRegistry(root)
    barrier.wait()
    for _ in range(count):
        reg.publish(src, CARD_FIELDS)


def test_reader_in_another_process_never_sees_a_partial_version(tmp_path):
    # A large file makes each publish take long enough to overlap the reader's reads.
    src = fake_onnx(tmp_path / "m.onnx", b"0123456789abcdef" * 256)  # 4 MB
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    writer = ctx.Process(target=_writer, args=(str(tmp_path / "reg"), str(src), 12, barrier))
    writer.start()
    reg = ModelRegistry(tmp_path / "reg")
    barrier.wait(timeout=60)
    seen, reads = [], 0
    deadline = time.monotonic() + 120
    while writer.is_alive() and time.monotonic() < deadline:
        latest = reg.latest()  # verifies every file's hash: a partial version would fail
        if latest is not None:
            reads += 1
            seen.append(latest.version)
            assert json.loads((latest.path / CARD).read_text())["version"] == latest.version
    writer.join(timeout=60)
    assert writer.exitcode == 0
    assert seen == sorted(seen), "latest() went backwards"
    assert reads > 0 and len(set(seen)) >= 2, "the reader never overlapped the writer"
    assert reg.versions() == list(range(1, 13))
    for v in reg.versions():
        reg.get(v)


def test_concurrent_writers_get_distinct_versions(tmp_path):
    src = fake_onnx(tmp_path / "m.onnx")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    writers = [ctx.Process(target=_writer, args=(str(tmp_path / "reg"), str(src), 8, barrier))
               for _ in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
        assert w.exitcode == 0
    reg = ModelRegistry(tmp_path / "reg")
    assert reg.versions() == list(range(1, 17))
    assert all(reg.get(v).card["version"] == v for v in reg.versions())


def test_trained_scale_range_from_the_cards_and_their_parents(tmp_path):
    from ptychopv.inference.registry import card_scale_range, shipped_registry

    assert card_scale_range({}) == (1.0, 1.0)                                    # frames as measured
    assert card_scale_range({"options": {"low_dose_factor": 10.0}}) == (10.0, 10.0)
    assert card_scale_range({"options": {"low_dose_range": [1.0, 30.0]}}) == (1.0, 30.0)
    reg = ModelRegistry(tmp_path / "reg")
    reg.publish(fake_onnx(tmp_path / "a.onnx", b"a"), dict(CARD_FIELDS, options={"low_dose_range": [2.0, 30.0]}))
    reg.publish(fake_onnx(tmp_path / "b.onnx", b"b"), dict(CARD_FIELDS, parent=1, options={"low_dose_factor": None}))
    reg.publish(fake_onnx(tmp_path / "c.onnx", b"c"), dict(CARD_FIELDS, options={"low_dose_factor": 50.0}))
    # a fine-tune on frames as measured keeps what its parent saw; an unrelated version does not inherit
    assert reg.trained_scale_range(1) == (1.0, 30.0)
    assert reg.trained_scale_range(2) == (1.0, 30.0)
    assert reg.trained_scale_range(3) == (50.0, 50.0)
    # the shipped models: the demo one saw frames as measured, the generic one up to 30x fewer counts
    assert ModelRegistry(shipped_registry("demo"), create=False).trained_scale_range(1) == (1.0, 1.0)
    assert ModelRegistry(shipped_registry("generic"), create=False).trained_scale_range(1) == (1.0, 30.0)


def test_a_seeded_copy_keeps_its_lineages_scale_range(tmp_path):
    """An empty registry is seeded with the shipped registry's latest version; where that version
    is a fine-tune on frames as measured whose parent saw scaled-down frames, the copy (which has
    no parent in the new registry) still reports the scalings its lineage was trained at."""
    from ptychopv.plugins.infer import InferPlugin
    from ptychopv.plugins.models import ModelManager

    shipped = ModelRegistry(tmp_path / "shipped")
    shipped.publish(fake_onnx(tmp_path / "a.onnx", b"a"), dict(CARD_FIELDS, options={"low_dose_range": [1.0, 40.0]}))
    shipped.publish(fake_onnx(tmp_path / "b.onnx", b"b"), dict(CARD_FIELDS, parent=1, options={}))
    m = ModelManager(InferPlugin("Infer"), tmp_path / "live", "passthrough", batch_sizes=(1,), report=lambda *a, **k: None)
    try:
        assert m.seed(shipped.root) == 1
        assert m.seed(shipped.root) is None                       # only an empty registry is seeded
    finally:
        m.close()
    live = ModelRegistry(tmp_path / "live", create=False)
    card = live.get(1).card
    assert card["parent"] is None and card["seeded_from"]["version"] == 2 and card["seeded_from"]["parent"] == 1
    assert live.trained_scale_range(1) == (1.0, 40.0)


def test_a_restorer_left_unlisted_by_a_crashed_attach_can_be_attached_again(tmp_path):
    """attach copies the file, then writes the card: a crash in between leaves restore.onnx in the
    folder but not on the card. Every later attach refused it ('already holds: detach it first') and
    detach could not remove it (the card has no entry naming it): the version could never get one."""
    pytest.importorskip("onnxruntime")
    from ptychopv.inference.registry import ModelRegistry, shipped_registry

    src = ModelRegistry(shipped_registry("demo"), create=False).get(1)
    reg = ModelRegistry(tmp_path / "reg")
    v = reg.publish(src.onnx_path, src.publishable_card()).version
    (reg.get(v).path / "restore.onnx").write_bytes(b"half of a crashed attach")   # the crash
    reg.get(v)                                        # the version itself still reads
    reg.detach(v, "restore")                          # nothing to detach: no card entry
    new = tmp_path / "r.onnx"
    new.write_bytes(b"the restorer")
    entry = {"file": "restore.onnx"}
    mv = reg.attach(v, "restore", entry, {"restore.onnx": new})
    assert mv.card["restore"] == entry and (mv.path / "restore.onnx").read_bytes() == b"the restorer"
