"""Files generated from a declaration (the database, the screens): write them, or check them.

One place for the rule both generators follow: ``--check`` names every stale file and fails,
otherwise every file is rewritten.
"""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(folder: Path, want: dict[str, str], command: str, check: bool) -> int:
    """Write ``want`` (file name -> text) into ``folder``, or with ``check`` report stale files (exit 1)."""
    stale = [n for n, text in want.items() if not (folder / n).exists() or (folder / n).read_text() != text]
    if check:
        for n in stale:
            print(f"{folder / n} is stale: run `{command}`", file=sys.stderr)
        return 1 if stale else 0
    folder.mkdir(parents=True, exist_ok=True)     # a --folder of one's own may not exist yet
    for n, text in want.items():
        (folder / n).write_text(text)
        print(f"wrote {folder / n}")
    return 0
