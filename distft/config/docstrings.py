"""Attribute docstrings of the config dataclasses (`x: int = 1` followed by a string), read from
the source with `ast` (Python keeps them nowhere at runtime): the reference page, --help and
the messages that name a key all quote them."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect


@functools.cache
def attr_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (`x: int = 1` followed by a string) of `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(inspect.getmodule(klass)))
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == klass.__name__)
        body = node.body
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
