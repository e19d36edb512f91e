"""scripts/make_demo_model.py: the corpus it simulates holds the training families asked for."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("make_demo_model", ROOT / "scripts" / "make_demo_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_corpus_holds_the_families_asked_for_and_v1s_by_default(tmp_path):
    from ptychopv.hpc.corpus import corpus_info

    from ptychopv.science import samples

    mod = _script()
    n = len(samples.TRAIN_FAMILIES)                       # one sample of each, in turn
    mod.build_corpus(tmp_path / "all.h5", n, 3, seed=0, size_px=96, families=tuple(samples.TRAIN_FAMILIES))
    ids = corpus_info(tmp_path / "all.h5").scans
    assert sorted(i.split("-", 2)[2] for i in ids) == sorted(samples.TRAIN_FAMILIES)
    assert all(n == 3 for n in ids.values())
    mod.build_corpus(tmp_path / "v1.h5", 3, 2, seed=0, size_px=96)
    assert sorted(i.split("-", 2)[2] for i in corpus_info(tmp_path / "v1.h5").scans) == sorted(samples.GENERIC_V1_FAMILIES)


def test_families_are_checked_and_only_for_the_generic_corpus(tmp_path, capsys):
    mod = _script()
    with pytest.raises(SystemExit):
        mod.main(["--families", "star", "--simulate-only", "--corpus-file", str(tmp_path / "c.h5")])
    assert "invalid choice: 'star'" in capsys.readouterr().err      # an evaluation family is refused
    with pytest.raises(SystemExit):
        mod.main(["--corpus", "natural", "--families", "grf", "--simulate-only", "--corpus-file", str(tmp_path / "c.h5")])
    assert "--families is for --corpus generic" in capsys.readouterr().err
    assert not (tmp_path / "c.h5").exists()
