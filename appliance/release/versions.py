"""Ordering release versions (PEP 440, as the appliance's own version is written), to refuse downgrades.

Standard library only: the device's installer runs without the `packaging` distribution.
"""

from __future__ import annotations

import re

from .verify import BundleError

# (release numbers, pre-release rank and number, post number, dev number): compared as PEP 440 orders versions
VersionKey = tuple[tuple[int, ...], tuple[float, int], int, float]

_VERSION = re.compile(
    r"^v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|b|c|rc|alpha|beta|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:(?:[-_.]?(?:post|rev|r)[-_.]?(?P<post_n>\d*))|-(?P<post_implicit>\d+))?"
    r"(?:[-_.]?(?P<dev>dev)[-_.]?(?P<dev_n>\d*))?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?$", re.IGNORECASE)
_PRE = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}
_LAST = float("inf")


def version_key(text: str) -> VersionKey:
    """A key that sorts versions as PEP 440 does: 1.0.dev1 < 1.0a1 < 1.0rc1 < 1.0 == 1.0.0 < 1.0.post1."""
    match = _VERSION.match(text.strip())
    if match is None:
        raise BundleError(f"version {text!r} is not a PEP 440 version, so it cannot be ordered")
    release = [int(part) for part in match["release"].split(".")]
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    post = match["post_n"] if match["post_n"] is not None else match["post_implicit"]
    if match["pre"]:
        pre: tuple[float, int] = (_PRE[match["pre"].lower()], int(match["pre_n"] or 0))
    elif match["dev"] and post is None:
        pre = (-1, 0)  # 1.0.dev1 sorts before 1.0a1
    else:
        pre = (_LAST, 0)
    return (tuple(release), pre, -1 if post is None else int(post or 0),
            int(match["dev_n"] or 0) if match["dev"] else _LAST)


def is_older(version: str, than: str) -> bool:
    return version_key(version) < version_key(than)
