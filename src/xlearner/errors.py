"""Exit statuses of the `xlearner` command and the error classes each stands for.

A leaf module (it imports nothing): ``cli.py`` turns errors into these codes, and a command that
answers with a status of its own (``data check``: ``EXIT_DATA_PROBLEMS``) reads it here, so no
command module imports the CLI. Error classes are matched by name along the exception's MRO, so
the classes themselves stay beside the code that raises them.
"""
from __future__ import annotations

# exit status, the error classes it stands for, and its meaning for the --help text and the README
EXIT_CODES: list[tuple[int, tuple[str, ...], str]] = [
    (0, (), "success"),
    (1, (), "unexpected internal error (a bug: rerun with --debug and report the traceback)"),
    (2, ("ConfigError",), "usage or configuration error: unknown key, wrong type, missing path, "
                          "malformed YAML"),
    (3, ("BadSampleError",), "bad data: a record that cannot be used under on_bad_sample: error, "
                             "or `data check` found problems"),
    (4, ("WeightsError", "CheckpointReadError"), "weights file or checkpoint refused or unusable: not "
                                                 "weights-only, no matching keys, damaged"),
    (5, ("NonFiniteLossError",), "training diverged (NaN/inf loss); the last good checkpoint is kept"),
    (6, ("OSError",), "a file could not be written or read (disk full, permission); the previous "
                      "checkpoint is intact"),
    (7, ("EmbeddedDataError",), "an embedded dataset could not be fetched or verified"),
    (130, ("KeyboardInterrupt",), "interrupted; continue a training run with --resume"),
]
_CODE_OF = {name: code for code, names, _ in EXIT_CODES for name in names}
EXIT_DATA_PROBLEMS = 3
"""``xlearner data check`` found problems (the status of bad data)."""


def exit_code(exc: BaseException) -> int:
    """The exit status of an error: that of the first class in its MRO listed in EXIT_CODES, else 1."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _CODE_OF:
            return _CODE_OF[cls.__name__]
    return 1


def exit_status_text() -> str:
    """The table of exit statuses, as the --help epilog shows it."""
    return "exit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, _, text in EXIT_CODES)
