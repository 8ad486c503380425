"""The package's user-facing error type.

An `HfSiglipError` says what is wrong and what to do in one line; the `hf-siglip` command prints it as
`hf-siglip: <message>` on stderr and exits with status 1, without a traceback. Other exceptions keep their
traceback: they are bugs or errors of the libraries underneath, and the traceback is what a report needs.
This module imports nothing, so the command can catch the type without slowing down `--help`.
"""


class HfSiglipError(Exception):
    """A problem the user can act on (bad input, a diverged run, corrupt weights), said in one line."""


__all__ = ["HfSiglipError"]
