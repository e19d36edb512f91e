"""Generate ``db/ptychopv.db`` (and the default access-security file) from the PV declaration.

``python -m ptychopv.ioc.dbgen`` rewrites them; ``--check`` exits 1 when they are stale.
It creates the records with the same code the IOC uses, under the prefix macro ``$(P)``,
and writes them as pythonSoftIOC would load them. Run it in its own process: the builder
keeps global state.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

from ..config import GENERATOR_CONFIG_HELP, generator_extensions
from ..io.generated import write_or_check

from .access import render_acf

HEADER = "# Generated from ptychopv/ioc/schema.py by `python -m ptychopv.ioc.dbgen`; do not edit.\n"


def render_db() -> str:
    from epicsdbbuilder.recordset import recordset

    from .records import create_records

    create_records("$(P)")
    out = io.StringIO()
    out.write(HEADER)
    recordset.Print(out, True)
    return out.getvalue()


def db_folder() -> Path:
    from .. import db

    return Path(db.__file__).parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="exit 1 if the files in db/ are stale")
    ap.add_argument("--folder", type=Path, default=None, help="where db files live (default: the package's db/)")
    ap.add_argument("--config", help=GENERATOR_CONFIG_HELP)
    args = ap.parse_args(argv)
    folder = args.folder or db_folder()
    if not generator_extensions(args.config, ap.prog):
        return 2
    return write_or_check(folder, {"ptychopv.db": render_db(), "ptychopv.acf": render_acf([], [])}, "python -m ptychopv.ioc.dbgen", args.check)


if __name__ == "__main__":
    sys.exit(main())
