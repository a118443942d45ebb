"""The artifact: one directory with manifest.json and the backend's files, written atomically.

Loading reads JSON and the model file only (no pickle anywhere) and checks every file's
sha256 against the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from .errors import QCError

FORMAT = "qcompiler-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dumps_manifest(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=1, sort_keys=True, allow_nan=True) + "\n").encode()


@dataclass
class Artifact:
    manifest: dict
    files: dict[str, bytes] = field(default_factory=dict)

    def finalize(self) -> "Artifact":
        self.manifest["files"] = {k: {"sha256": sha256(v), "bytes": len(v)} for k, v in sorted(self.files.items())}
        return self

    def save(self, out_dir: str | os.PathLike, *, force: bool = False) -> str:
        """Write into a temp directory beside `out_dir`, then rename it into place."""
        out = os.path.abspath(os.fspath(out_dir))
        check_output_dir(out, force=force)
        parent = os.path.dirname(out)
        self.finalize()
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
        try:
            for name, data in sorted(self.files.items()):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            with open(os.path.join(tmp, MANIFEST), "wb") as f:
                f.write(dumps_manifest(self.manifest))
            os.chmod(tmp, 0o755)
            if os.path.exists(out):
                trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
                os.rename(out, os.path.join(trash, "old"))
                os.rename(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def check_output_dir(out: str, *, force: bool = False) -> None:
    """Refuse an existing non-empty directory (unless force) or an unwritable parent."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise QCError(f"{out}: exists and is not a directory")
        if os.listdir(out) and not force:
            raise QCError(f"{out}: output directory exists and is not empty (use --force to replace it)")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise QCError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QCError(f"{out}: cannot write into {parent} (permission denied)")


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """Read and check an artifact directory: manifest format and every file's sha256."""
    path = os.fspath(path)
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise QCError(f"{path}: not a qcompiler artifact (no {MANIFEST})")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QCError(f"{mpath}: corrupt manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise QCError(f"{mpath}: not a qcompiler manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise QCError(f"{mpath}: format version {manifest.get('format_version')} is newer than this qcompiler reads "
                      f"({FORMAT_VERSION})")
    files = {}
    for name, info in manifest.get("files", {}).items():
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise QCError(f"{path}: file {name} listed in the manifest is missing")
        with open(fp, "rb") as f:
            data = f.read()
        if sha256(data) != info["sha256"]:
            raise QCError(f"{fp}: content does not match the manifest's sha256 (file modified or truncated)")
        files[name] = data
    return manifest, files
