"""Model registry: a folder of immutable, numbered versions.

Layout::

    <root>/v0001/model.onnx    the network, ONNX, dynamic batch axis
    <root>/v0001/weights.pt    the same weights for the PyTorch engines (tensors only)
    <root>/v0001/card.json     the model card (below)
    <root>/v0002/...

Card keys: ``version``, ``parent`` (version it was warm-started from, or null), ``created``
(UTC ISO 8601), ``model`` (name), ``model_config`` (what rebuilds it), ``outputs``,
``input_shape`` ``[1, H, W]``, ``preprocessing`` (see ``preprocessing.py``), ``corpus``,
``scans``, ``pairs``, ``epochs``, ``val_loss``, ``val_ssim``, ``sha256`` (of model.onnx) and
``files`` (name -> sha256 for every file in the folder), plus whatever else the publisher adds.

Versions only grow. A version is assembled in a hidden temporary folder and renamed into place
in one step, so a reader in another process sees a version completely or not at all; two
writers racing for a number both succeed, one with the next number. ``get`` refuses a version
whose files do not match the hashes on its card.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CARD = "card.json"
ONNX = "model.onnx"
WEIGHTS = "weights.pt"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_RESERVED = {"version", "created", "sha256", "files"}


class RegistryError(ValueError):
    """A missing, corrupt or tampered version, or a bad publish request."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every OS; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ModelVersion:
    version: int
    path: Path
    card: dict

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX

    @property
    def weights_path(self) -> Path | None:
        p = self.path / WEIGHTS
        return p if p.exists() else None

    def source(self):
        """The ``ModelSource`` an inference engine loads."""
        from .engines.base import ModelSource

        return ModelSource.from_version(self)


class ModelRegistry:
    def __init__(self, root: str | os.PathLike, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise RegistryError(f"model registry {self.root} does not exist")

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[int]:
        """Published version numbers, ascending."""
        if not self.root.is_dir():
            return []
        found = (_VERSION_DIR.match(p.name) for p in self.root.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def _folder(self, version: int) -> Path:
        return self.root / f"v{version:04d}"

    def _read_card(self, version: int) -> dict:
        path = self._folder(version) / CARD
        try:
            card = json.loads(path.read_text())
        except FileNotFoundError:
            raise RegistryError(f"model version {version} not found in {self.root} "
                                f"(have: {self.versions() or 'none'})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"model card {path} is not valid JSON: {exc}") from None
        if card.get("version") != version:
            raise RegistryError(f"{path} says version {card.get('version')}, folder says {version}")
        return card

    def verify(self, version: int) -> dict:
        """The card of ``version`` after checking every file against its hash."""
        card = self._read_card(version)
        files = card.get("files")
        if not isinstance(files, dict) or ONNX not in files:
            raise RegistryError(f"model card of version {version} lists no file hashes")
        for name, expected in files.items():
            path = self._folder(version) / name
            if not path.is_file():
                raise RegistryError(f"model version {version}: {name} is missing")
            actual = _sha256(path)
            if actual != expected:
                raise RegistryError(f"model version {version}: {name} has sha256 {actual[:12]}..., "
                                    f"the card says {expected[:12]}...: refusing a file that "
                                    f"changed after publishing")
        return card

    def get(self, version: int | str = "latest", verify: bool = True) -> ModelVersion:
        """A version by number, or ``"latest"``; checked against its hashes unless told not to."""
        if version == "latest":
            have = self.versions()
            if not have:
                raise RegistryError(f"model registry {self.root} has no versions")
            version = have[-1]
        if isinstance(version, str) and version.lstrip("v").isdigit():
            version = int(version.lstrip("v"))
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int or 'latest', got {version!r}")
        card = self.verify(version) if verify else self._read_card(version)
        return ModelVersion(version, self._folder(version), card)

    def latest(self, verify: bool = True) -> ModelVersion | None:
        """The newest version, or None for an empty registry."""
        return self.get("latest", verify) if self.versions() else None

    def list(self) -> list[dict]:
        """All cards, oldest first (not hash-checked: that is ``get``'s job)."""
        return [self._read_card(v) for v in self.versions()]

    # ------------------------------------------------------------------ writing
    def publish(self, onnx_path: str | os.PathLike, card: dict,
                weights_path: str | os.PathLike | None = None) -> ModelVersion:
        """Copy the files into a new version with ``card``; returns it, hashes verified."""
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise RegistryError(f"ONNX file {onnx_path} does not exist")
        clash = _RESERVED & set(card)
        if clash:
            raise RegistryError(f"card keys {sorted(clash)} are set by the registry, not the caller")
        for key in ("model", "input_shape", "outputs"):
            if key not in card:
                raise RegistryError(f"card lacks {key!r}")
        parent = card.get("parent")
        if parent is not None and parent not in self.versions():
            raise RegistryError(f"parent version {parent} is not in {self.root}")
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.root))
        tmp.chmod(0o755)  # mkdtemp makes it private; a version is read by other users' processes
        try:
            files = {ONNX: onnx_path}
            if weights_path is not None:
                files[WEIGHTS] = Path(weights_path)
            hashes = {}
            for name, src in files.items():
                shutil.copyfile(src, tmp / name)
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
                hashes[name] = _sha256(tmp / name)
            base = dict(card, sha256=hashes[ONNX], files=hashes,
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            return self._commit(tmp, base)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, tmp: Path, card: dict) -> ModelVersion:
        """Number the version and rename it into place; retry if another writer took it."""
        for _ in range(1000):
            have = self.versions()
            version = (have[-1] if have else 0) + 1
            full = {"version": version, **card}
            (tmp / CARD).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
            with open(tmp / CARD, "rb+") as f:
                os.fsync(f.fileno())
            try:
                os.rename(tmp, self._folder(version))  # fails if the folder exists (not empty)
            except OSError:
                if not self._folder(version).exists():
                    raise
                continue
            _fsync_dir(self.root)
            return ModelVersion(version, self._folder(version), full)
        raise RegistryError(f"could not publish to {self.root}: too many concurrent writers")

    def __repr__(self):
        return f"ModelRegistry({str(self.root)!r}, versions={self.versions()})"
