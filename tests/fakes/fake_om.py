"""The fake OM file (tests only): what tests/fakes/bin/atc writes and tests/fakes/aclruntime.py loads.

A real OM is self-contained: it runs on a host that never saw the ONNX it was made
from (a second node that the OM reached through Ray's object store). So is this one:
one line of JSON, the header, then the ONNX's bytes as they were::

    {"format": "fake-om/2", "onnx": "/abs/path/model.onnx", "input_name": "image",
     "input_shape": [4, 3, 256, 192], "gears": null, "soc_version": "Ascend310P3",
     "atc": [...argv...], "onnx_size": 1234, "onnx_sha256": "..."}\\n
    <onnx_size bytes of ONNX>

``onnx`` names the file ATC was given (where it was on the converting host, for
tests to check); the loader never opens it, it runs the embedded bytes. The file is
not JSON: read its header with ``read_header``. The fake atc, which runs alone (it is
copied into fake toolkits), writes the same format with its own copy of ``write_fake_om``.
"""
from __future__ import annotations

import hashlib
import json

FORMAT = "fake-om/2"


class FakeOmError(ValueError):
    """Not a fake OM of this format, or a truncated one."""


def write_fake_om(path, header: dict, onnx: bytes) -> None:
    """``path`` as a fake OM: ``header`` (its format, size and sha256 set here) then ``onnx``."""
    header = {**header, "format": FORMAT, "onnx_size": len(onnx), "onnx_sha256": hashlib.sha256(onnx).hexdigest()}
    with open(path, "wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        f.write(onnx)


def read_header(path) -> dict:
    """The fake OM's header alone (its ONNX bytes not read)."""
    with open(path, "rb") as f:
        return _parse(f.readline())


def read_fake_om(path) -> tuple[dict, bytes]:
    """The fake OM's header and the ONNX bytes it holds; FakeOmError when it is none or cut short."""
    with open(path, "rb") as f:
        header = _parse(f.readline())
        onnx = f.read()
    if len(onnx) != header.get("onnx_size"):
        raise FakeOmError(f"{len(onnx)} ONNX bytes, the header says {header.get('onnx_size')}")
    return header, onnx


def rewrite_header(path, **changes) -> dict:
    """Change header fields of the fake OM at ``path`` in place, its ONNX kept (a test's doctored OM)."""
    header, onnx = read_fake_om(path)
    header.update(changes)
    write_fake_om(path, header, onnx)
    return header


def _parse(line: bytes) -> dict:
    try:
        header = json.loads(line)
    except ValueError as e:  # UnicodeDecodeError is one
        raise FakeOmError(f"no fake OM header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FakeOmError(f"format {header.get('format') if isinstance(header, dict) else None!r}, not {FORMAT}")
    return header
