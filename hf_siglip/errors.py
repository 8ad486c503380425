"""The package's user-facing error types.

An `HfSiglipError` says what is wrong and what to do in one line. The `hf-siglip` command prints it on stderr as
`hf-siglip <command>: error: <message>`, without a traceback, as argparse reports a usage error:

* `UsageError`: a mistake in what was asked (flags, recipe, paths, data layout, Hub access): exit status 2,
  argparse's status for usage errors. It holds every problem found in one pass (`problems`); one problem prints
  as one line, several as a count followed by one `  - ` line each.
* any other `HfSiglipError` (a diverged run, corrupt weights, a peer that stopped answering): exit status 1.

Other exceptions keep their traceback: they are bugs or errors of the libraries underneath, and the traceback is
what a report needs. `hf-siglip --debug ...` (or HF_SIGLIP_DEBUG=1) shows the traceback of these errors too.
This module imports nothing heavy, so the command can catch the types without slowing down `--help`.
"""

import contextlib
import os


class HfSiglipError(Exception):
    """A problem the user can act on (bad input, a diverged run, corrupt weights), said in one line."""


class UsageError(HfSiglipError, ValueError):
    """What was asked cannot work as given: a flag, a recipe key or value, a path, a split, Hub access. A
    `ValueError` too, so code that caught bad settings as `ValueError` still does. `problems` lists each one."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else [str(problem) for problem in problems]
        super().__init__(self._message())

    def _message(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems in the configuration:\n" + "\n".join(
            f"  - {problem}" for problem in self.problems)


def error_message(error: BaseException) -> str:
    """The message of an exception as a user reads it (a KeyError's own message, not its repr)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error) or type(error).__name__


@contextlib.contextmanager
def own_messages_as_usage_errors():
    """Inside the block, a `ValueError`, `KeyError` or `FileNotFoundError` that hf_siglip's own code raised (the
    innermost frame of its traceback is in this package: a missing split or column, a malformed metadata line, an
    output folder that holds checkpoints) is a message for the user, re-raised as a `UsageError`; so are a Hub id
    that does not exist and a Hub that cannot be reached. One raised inside another library keeps its type and
    traceback."""
    try:
        yield
    except HfSiglipError:
        raise
    except ConnectionError as error:  # datasets: "Couldn't reach 'user/name' on the Hub (OfflineModeIsEnabled)"
        raise UsageError(f"{error_message(error)}: no connection to the Hub, offline mode (HF_HUB_OFFLINE=1), or no "
                         "such dataset or model there") from error
    except (ValueError, KeyError, FileNotFoundError) as error:
        if type(error).__name__ in _HUB_NOT_FOUND:  # a Hub id that does not exist (or is not accessible)
            raise UsageError(error_message(error).splitlines()[0]) from error
        frame = error.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        if frame is not None and os.path.abspath(frame.tb_frame.f_code.co_filename).startswith(_PACKAGE + os.sep):
            raise UsageError(error_message(error)) from error
        raise


_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_HUB_NOT_FOUND = ("DatasetNotFoundError", "RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                  "EntryNotFoundError")

__all__ = ["HfSiglipError", "UsageError", "error_message", "own_messages_as_usage_errors"]
