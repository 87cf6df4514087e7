"""The exception tree: every failure a user can meet is a FusestreamError naming the file."""

import logging


class FusestreamError(Exception):
    """Base of all fusestream errors; str() is the one line a user sees."""


class InvalidImageError(FusestreamError):
    """An image file is malformed, truncated, hostile or not an image at all."""


class UnsupportedImageError(FusestreamError):
    """An image is well-formed but uses something we refuse to handle (unknown feature bits)."""


class BackingFileError(FusestreamError):
    """The backing chain cannot be opened: missing or unreadable file, loop, too deep."""


class CorruptionError(FusestreamError):
    """Metadata found corrupt while serving I/O; the affected range fails with EIO."""


class ImageBusyError(FusestreamError):
    """The image is already opened for writing by another fusestream process."""


class ReadOnlyImageError(FusestreamError):
    """A write, discard or header change of an image opened read-only (EROFS to the guest)."""


class SourceError(FusestreamError):
    """A byte source cannot give what was asked, for longer than retries allow: a remote
    object that changed since the mount, a server that keeps failing (EIO to the guest)."""


class StreamError(FusestreamError):
    """The stream job cannot go on; the message names the offset and the cause."""


class CommandError(FusestreamError):
    """A control command that is invalid now; nothing was changed (EINVAL to the writer of ctl)."""


class UsageError(FusestreamError):
    """Bad command line or -o option."""


def describe_os_error(path: str, err: OSError) -> str:
    """One line for an OSError on `path`, without Python's '[Errno N]' noise."""
    return f"{path}: {err.strerror or err}"


def printable(text: str) -> str:
    """`text` with every character that is not printable (newlines, terminal escapes, other
    control and format characters) written as a Python escape, so that text an image supplies
    (a backing file name) cannot start lines or drive the terminal where it is shown."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)


class PrintableFormatter(logging.Formatter):
    """Log lines whose message is passed through printable(): one record, one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = printable(record.message)
        return super().formatMessage(record)
