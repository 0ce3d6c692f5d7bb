"""Errors a user can cause. Each carries a one-line message naming the problem and the fix.

The CLI prints ``error: <message>`` and exits non-zero for any :class:`EdgerunError`; anything
else is a bug in edgerun and keeps its traceback.
"""

from __future__ import annotations


# line breaks and other control characters a message may quote from a user's file (a YAML key "a\nb",
# a GGUF tensor name): escaped, so the message stays one line on the terminal
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7f, 0x85] if c != 0x09}
_ESCAPES.update({0x0a: "\\n", 0x0d: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


class EdgerunError(Exception):
    """Base class of every error a user can cause (bad input, missing model, no network).

    The message is kept to one line: control characters in it (quoted from a user's file) are escaped.
    """

    exit_code = 1

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (args[0].translate(_ESCAPES),) + args[1:]
        super().__init__(*args)


class UnknownModelError(EdgerunError):
    """A model name that is neither in the catalog nor a path to an existing file."""


class ModelFileError(EdgerunError):
    """A model file that is missing, not of the expected format, truncated or corrupted."""


class DownloadError(EdgerunError):
    """The package registry could not be reached, or it did not serve the pinned package."""


class ChecksumError(EdgerunError):
    """A downloaded file whose sha256 differs from the one pinned in the catalog."""


class ChatTemplateError(EdgerunError):
    """A model without a usable chat template, or a template that fails to render."""


class BackendError(EdgerunError):
    """An engine refused to load a model or to run a request with the given options."""


class UsageError(EdgerunError):
    """Invalid options or arguments (bad value, empty prompt, conflicting flags)."""

    exit_code = 2
