"""The Lua scripts, read from ``lua/`` once at import: one file per script, each headed by the
KEYS, ARGV and reply it takes and gives.

A file becomes the script Redis runs in one step, here, and only two things happen in it:

- Shared Lua: a script whose first line is ``-- luacheck: read globals NAME...`` uses the
  functions of ``lua/lib/NAME.lua``; each is put in front of it, in the order named. The same
  line tells luacheck that the names come from outside the file.
- Constants: a line ``local NAME = 'VALUE' -- constant: DeliveryState.MEMBER`` gets VALUE from
  the enum named (results.py, the one place the values are defined). The files carry the same
  values, so ``redis-cli --eval`` runs a file as it is (tests/test_lua.py checks that this step
  changes no value in them).

``python -m otp_service.store NAME`` prints the script NAME as Redis runs it (for a script with
shared Lua, to give ``redis-cli --eval``).
"""

from __future__ import annotations

import re
from importlib import resources

from otp_service.results import DeliveryState

_LUA = resources.files(__package__) / "lua"
_USES = re.compile(r"-- luacheck: read globals ([\w ]+)\n")
_CONSTANT = re.compile(r"^(local \w+ = )'[^']*'( -- constant: (\w+)\.(\w+))$", re.M)
_ENUMS = {"DeliveryState": DeliveryState}


def _constants(source: str) -> str:
    def value(match: re.Match[str]) -> str:
        member = _ENUMS[match[3]][match[4]]
        return f"{match[1]}'{member.value}'{match[2]}"

    return _CONSTANT.sub(value, source)


def compose(name: str) -> str:
    """The script ``lua/NAME.lua`` as Redis runs it: shared Lua first, constants filled in."""
    source = (_LUA / f"{name}.lua").read_text()
    uses = _USES.match(source)
    libraries = (
        [(_LUA / "lib" / f"{lib}.lua").read_text() for lib in uses[1].split()] if uses else []
    )
    return _constants("".join([*libraries, source]))


NAMES = sorted(
    entry.name.removesuffix(".lua") for entry in _LUA.iterdir() if entry.name.endswith(".lua")
)
# Each script as Redis runs it, by its file's name.
SCRIPTS = {name: compose(name) for name in NAMES}

# The commands the scripts run inside Redis. INFO commandstats counts them too; the tests and
# the bench leave them out to count round trips.
SCRIPT_COMMANDS = frozenset(
    name.lower()
    for source in SCRIPTS.values()
    for name in re.findall(r"redis\.call\('(\w+)'", source)
)
