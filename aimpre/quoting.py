"""Names and strings that go into paths and generated scripts: checked here, so that no name climbs out of its
folder and no value becomes a line of its own in a bash script or an ``#SBATCH`` header.

A *plain name* (run names, sweep names, sweep groups and points) is one path component: letters, digits, ``.``,
``_`` and ``-``, starting with a letter or digit (so no ``..``, no hidden file, no ``/``), at most 128 characters.
Any other string that goes into a script (a time limit, an extra ``#SBATCH`` option, a path) must be one line
without control characters; bash gets it through ``shlex.quote``, ``#SBATCH`` lines through ``sbatch_quote``.
"""

from __future__ import annotations

import re

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."


def plain_name(value: object, what: str) -> str:
    """``value`` if it is a plain name (see the module docstring), else a ValueError naming ``what``.

    Args:
        value: the name to check (anything: it may come from a file).
        what: the config key, flag or file field it came from, for the message.
    """
    if not isinstance(value, str) or not PLAIN_NAME.fullmatch(value):
        shown = _shown(value) if isinstance(value, str) else type(value).__name__
        raise ValueError(
            f"{what}: {shown} is not a plain name (letters, digits, '.', '_' and '-', starting with a letter or "
            f"digit, at most 128 characters; no '/', no leading dot)"
        )
    return value


def one_line(value: str, what: str) -> str:
    """``value`` if it holds no newline or other control character (which would end a script line), else a
    ValueError naming ``what``."""
    if m := _CONTROL.search(value):
        raise ValueError(f"{what}: {_shown(value)} holds a control character ({m[0]!r}); it must be one line")
    return value


def sbatch_quote(value: str, what: str) -> str:
    """``value`` for an ``#SBATCH`` line: sbatch splits those at whitespace, honouring double quotes and
    backslashes; a newline cannot be quoted there, so it is refused (naming ``what``)."""
    one_line(value, what)
    if value and not re.search(r'[\s"\\#]', value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
