"""An IOC whose Model:Select hook is the chain's own (ioc.chain.LiveChain._model_select) over a
stand-in model manager whose loads end only when the test says: a load of version 3 fails, any
other succeeds, once ``<folder>/release`` exists; version 7 is refused by the check. Run as a child process by tests/test_faults.py
(EPICS starts once per process). Argument: the folder holding ioc.yaml."""

import os
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path

folder = Path(sys.argv[1])

from ptychopv.config import load_config  # noqa: E402
from ptychopv.ioc.server import PtychoIOC, epics_environment  # noqa: E402

cfg = load_config(folder / "ioc.yaml")
os.environ.update(epics_environment(cfg))

from ptychopv.ioc.chain import LiveChain  # noqa: E402
from ptychopv.plugins.models import ModelError  # noqa: E402


class Models:
    selected = 0
    calls: list = []

    def check(self, v):
        if int(v) == 7:
            raise ValueError("model v7 is not in the registry")

    def select(self, v):
        self.calls.append(int(v))
        (folder / "calls").write_text(",".join(map(str, self.calls)))
        self.selected = int(v)
        f = Future()

        def work():
            while not (folder / "release").exists():
                time.sleep(0.01)
            if int(v) == 3:
                f.set_exception(ModelError("model v3 not loaded: broken (made so)"))
            else:
                f.set_result(int(v))

        threading.Thread(target=work, daemon=True).start()
        return f


ioc = PtychoIOC(cfg)
ioc.build()
chain = LiveChain.__new__(LiveChain)
chain.ioc, chain.models, chain._messages, chain._standing = ioc, Models(), {}, {}
ioc.on("Model:Select")(chain._model_select)
ioc.check("Model:Select")(chain.models.check)

from softioc import asyncio_dispatcher, builder, softioc  # noqa: E402

builder.LoadDatabase()
softioc.iocInit(asyncio_dispatcher.AsyncioDispatcher())
print("ptychopv ioc: ready", flush=True)
sys.stdin.read()          # until the test closes our stdin
os._exit(0)
