"""How a stage's Message_RBV is composed (ioc.chain.LiveChain._message/_show/_news), without
EPICS: news, a standing warning, the start's note, and the record's 255 characters."""

from __future__ import annotations

import types

from ptychopv.ioc.chain import LiveChain


def chain_with_messages():
    shown = []
    ioc = types.SimpleNamespace(notes={}, message=lambda stage, text, severity=0: shown.append((stage, text, severity)))
    chain = LiveChain.__new__(LiveChain)
    chain.ioc, chain._messages, chain._standing = ioc, {}, {}
    return chain, shown


def test_a_standing_warning_stays_beside_news_until_it_ends():
    chain, shown = chain_with_messages()
    chain._message("Infer", "model v1 not loaded (broken); no model runs", 2, standing=True)
    chain._news("source", "Infer", "connected to DET:Image", 0)
    assert shown[-1] == ("Infer", "connected to DET:Image (still: model v1 not loaded (broken); no model runs)", 2)
    chain._message("Infer", "running model v2 on onnxruntime-cpu", 0, standing=False)
    chain._news("source", "Infer", "DET:Image disconnected", 2)
    assert shown[-1] == ("Infer", "DET:Image disconnected", 2)
    assert shown[-2] == ("Infer", "running model v2 on onnxruntime-cpu", 0)


def test_long_news_keeps_60_characters_and_what_stands_gets_the_rest_of_255():
    chain, shown = chain_with_messages()
    chain.ioc.notes["Infer"] = "autosave: 3 settings not restored, defaults used: " + ", ".join(f"S{i}" for i in range(40))
    chain._message("Infer", "model v7 not loaded (" + "x" * 100 + ")", 1, standing=True)
    chain._news("source", "Infer", "N" * 300, 0)
    stage, text, severity = shown[-1]
    assert len(text) == 255 and severity == 1
    assert text.startswith("N" * 57 + "... (still: model v7 not loaded")
    short = "detector connected"
    chain._news("source", "Infer", short, 0)
    assert shown[-1][1].startswith(short + " (still: model v7") and "at start: autosave: 3 settings" in shown[-1][1]
