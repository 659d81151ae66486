"""Names and secrets: the one set of rules that every path checks them by (the config, the boot partition's settings
file, `appliance mqtt-users` for Ansible).

Each check returns the reason a value is refused, or None. A reason never contains the value: problem lists end up
on the console, in ``firstboot.json`` and in the retained MQTT status that every broker account can read, so a
secret must be named by its key, never shown. Patterns are anchored with ``fullmatch`` (``$`` would let a
trailing newline through).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from pathlib import Path

#: a broker account: it becomes a topic level (``replies/<name>/#``, the ``%u`` of the ACL) and a line of the
#: password file, so no '/', '+', '#', ':' or white space
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ACCOUNT_NAME_RULE = "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
#: an HTTP API key travels in an `Authorization: Bearer` header: printable ASCII, no spaces
API_KEY = re.compile(r"[!-~]{16,256}")
API_KEY_RULE = "16-256 printable ASCII characters without spaces"
PASSWORD_MIN, PASSWORD_MAX = 8, 256
SERVICE_USER = "appliance"  # the broker account of the appliance itself; never one of the operator's


def control_character(text: str) -> str | None:
    """The first control or line-separating character of ``text`` as ``U+XXXX``, or None."""
    for char in text:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return f"U+{ord(char):04X}"
    return None


def account_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not ACCOUNT_NAME.fullmatch(name):
        return f"a user name is {ACCOUNT_NAME_RULE}"
    return None


def password_problem(password: object) -> str | None:
    """A broker password (what an operator types into a sensor)."""
    if not isinstance(password, str):
        return "the password must be a string"
    if not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        return f"the password must be {PASSWORD_MIN}-{PASSWORD_MAX} characters long"
    if (char := control_character(password)) is not None:
        return f"the password contains a control character ({char}); line breaks and tabs are not allowed"
    return None


def api_key_problem(key: object) -> str | None:
    if not isinstance(key, str) or not API_KEY.fullmatch(key):
        return f"an API key is {API_KEY_RULE}"
    return None


def secret_file_problem(path: Path, rule: Callable[[str], str | None] | None = None) -> str | None:
    """What is wrong with a file holding a secret on its first line (the rest must be empty), or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return "file not found"
    except PermissionError:
        return "cannot be read (permission denied)"
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    lines = text.strip().splitlines()
    if not lines:
        return "file is empty"
    if len(lines) > 1:
        return "must hold the secret on one line and nothing else"
    secret = lines[0].strip()
    if (char := control_character(secret)) is not None:
        return f"the secret in it contains a control character ({char})"
    return rule(secret) if rule is not None else None


def account_problems(users: Mapping[str, object], where: str) -> list[str]:
    """Every problem of a ``name -> password`` table ("" removes an account); names are shown, passwords never."""
    problems = []
    for name, password in users.items():
        if name == SERVICE_USER:
            problems.append(f"{where}.{name}: reserved for the appliance's own account")
        elif (reason := account_name_problem(name)) is not None:
            problems.append(f"{where}.{name!r}: {reason}")
        elif password != "" and (reason := password_problem(password)) is not None:
            problems.append(f"{where}.{name}: {reason} (\"\" removes the account)")
    return problems
