"""Where shared artifacts live: a local path or an object-store URI, behind one small API.

A location is either a filesystem path or a URI with a scheme (`s3://bucket/rayrec/index`,
`gs://...`, `az://...`, `file:///shared/rayrec`). LanceDB and Ray Train open such URIs
themselves; the few small files we keep next to them (the index's `builds.json`) go through
pyarrow's filesystems, which read credentials from the environment (AWS_* variables or the
instance role), never from our config.
"""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` (object stores, file://), False for a plain path."""
    return isinstance(location, str) and bool(_SCHEME.match(location))


def join(location: str | Path, *names: str) -> str:
    """`location/name/...`, keeping a URI's scheme intact (pathlib would fold `s3://` to `s3:/`)."""
    if is_uri(location):
        return posixpath.join(str(location).rstrip("/"), *names)
    return str(Path(location).joinpath(*names))


def read_text(location: str | Path) -> str | None:
    """The file's text, or None when it does not exist."""
    if not is_uri(location):
        p = Path(location)
        return p.read_text() if p.is_file() else None
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(str(location))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(location: str | Path, text: str) -> None:
    """Replace the file's content whole: a temp file and a rename locally, one PUT on an object store."""
    if not is_uri(location):
        from common.artifacts import atomic_write_text

        atomic_write_text(Path(location), text)
        return
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(str(location))
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))
