"""Secrets of a distft-rlaif run (the judge's API key) never reach a message, a log line or an
output file: every configured secret is registered here and replaced by `[redacted]` in all text
distft-rlaif prints or writes, including an endpoint's error body that echoes the key.

A judge.api_key_env that is not the name of an environment variable but looks like the key itself
(pasted by mistake) is a secret too, and is refused without being shown.
"""

from __future__ import annotations

import os
import re

MASK = "[redacted]"
_SECRETS: set[str] = set()
# Conventional environment variable names (OPENAI_API_KEY): upper case, digits, underscores.
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


def register(value: str | None) -> None:
    if value and len(value.strip()) >= 4:  # shorter values would mask ordinary words
        _SECRETS.add(value.strip())


def redact(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def looks_like_a_key(name: str) -> bool:
    """A value of judge.api_key_env that is no conventional variable name and is not set."""
    return not ENV_NAME.fullmatch(name) and name not in os.environ
