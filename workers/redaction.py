"""Secrets kept out of what adaptune logs, saves and prints. Standard library only: the driver uses it too.

Values under secret-looking keys, values that look like credentials themselves and the user:password
part of URLs become `***`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

_SECRET_KEY = re.compile(r"(^|[._-])(token|password|passwd|secret|credentials?|auth|(api|access|private)?[_-]?key)$",
                         re.IGNORECASE)
_SECRET_VALUE = re.compile(
    r"^(hf_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
    r"|(AKIA|ASIA)[0-9A-Z]{16}|xox[abprs]-[A-Za-z0-9-]{10,}|eyJ[\w-]+\.[\w-]+\.[\w-]+)$"
)
_USERINFO = re.compile(r"^(\w[\w+.-]*://)[^/@\s:]*:[^/@\s]*@")
_USERINFO_ANYWHERE = re.compile(r"(\w[\w+.-]*://)[^/@\s:]*:[^/@\s]*@")
_SECRET_WORD = re.compile(r"\b" + _SECRET_VALUE.pattern.removeprefix("^").removesuffix("$") + r"\b")


def is_secret_key(key: str) -> bool:
    """Whether the last part of a dotted key names a secret (`hf_token`, `tracking.password`)."""
    return bool(_SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact_value(value: str) -> str:
    """`value` with credentials removed: a token-shaped value entirely, a URL's user:password part."""
    if _SECRET_VALUE.match(value.strip()):
        return REDACTED
    return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)


def redact_text(text: str) -> str:
    """Free text (an error, a log line) with every URL's user:password and every token-shaped word removed."""
    text = _USERINFO_ANYWHERE.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return _SECRET_WORD.sub(REDACTED, text)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of a JSON-like tree with every secret replaced by `***`."""
    if key and is_secret_key(key) and tree is not None:
        return REDACTED
    if isinstance(tree, Mapping):
        return {k: redact(v, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [redact(v) for v in tree]
    return redact_value(tree) if isinstance(tree, str) else tree
