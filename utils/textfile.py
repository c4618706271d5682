"""Text files given by the user (configs, list files), read as UTF-8 or refused in one line."""
from __future__ import annotations

from .errors import SetupError


def read_utf8(path: str, what: str) -> str:
    """The contents of `path` decoded as UTF-8; SetupError naming `what` and `path`, with the byte
    offset of the first invalid byte, when it is not UTF-8 text (e.g. a binary file or Latin-1)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SetupError(f"{what} {path}: cannot read: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SetupError(f"{what} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start})") \
            from None
