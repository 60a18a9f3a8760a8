"""`keep`: which scored images a curated job keeps, as a small expression over score columns.

    keep: "clip_score >= 0.28 and nsfw_score < 0.2"

The expression is parsed with `ast` and only comparisons, `and` / `or` / `not`, parentheses,
numbers and the names of score columns the job computes are allowed: no calls, attributes,
subscripts or other names, so evaluating it runs no code of the user's. It is checked before
any work and evaluated on each image's scores on the worker.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
from collections.abc import Collection, Mapping
from dataclasses import dataclass

MAX_LENGTH = 1000  # characters of a keep expression

_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}


class KeepError(ValueError):
    """The keep expression cannot be used; the message is one line."""


@dataclass(frozen=True)
class KeepRule:
    """A checked keep expression: `keeps(scores)` tells whether an image's scores pass it."""

    text: str
    names: frozenset[str]  # the score columns it reads

    @classmethod
    def parse(cls, text: str, columns: Collection[str]) -> KeepRule:
        """Check `text` against the score columns the job computes; KeepError when it is unsafe,
        malformed or names a score not computed."""
        text = str(text).strip()
        if not text:
            raise KeepError("keep is empty")
        if len(text) > MAX_LENGTH:
            raise KeepError(f"keep is over {MAX_LENGTH} characters")
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise KeepError(f"keep {text!r} does not parse ({exc.msg})") from None
        names: set[str] = set()
        _check(tree.body, names)
        unknown = sorted(names - set(columns))
        if unknown:
            known = ", ".join(sorted(columns)) or "none: set scores"
            raise KeepError(f"keep names {', '.join(unknown)}, not a score this job computes ({known})")
        return cls(text, frozenset(names))

    def keeps(self, scores: Mapping[str, float]) -> bool:
        """Whether an image with these scores is kept (a NaN score fails every comparison)."""
        return bool(_evaluate(self._tree, scores))

    @functools.cached_property
    def _tree(self) -> ast.expr:
        return ast.parse(self.text, mode="eval").body


def _check(node: ast.AST, names: set[str]) -> None:
    """Allow only a boolean expression of comparisons between score names and numbers."""
    if isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value, names)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        _check(node.operand, names)
    elif isinstance(node, ast.Compare):
        if not all(type(op) in _COMPARE for op in node.ops):
            raise KeepError("keep compares with <, <=, >, >=, == and != only")
        for operand in (node.left, *node.comparators):
            _check_operand(operand, names)
    else:
        raise KeepError(f"keep is a condition on scores (comparisons joined by and/or/not), not {_what(node)}")


def _check_operand(node: ast.AST, names: set[str]) -> None:
    if isinstance(node, ast.Name):
        names.add(node.id)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        _check_operand(node.operand, names)
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if not math.isfinite(node.value):
            raise KeepError("keep compares with finite numbers only")
    else:
        raise KeepError(f"keep compares score names with numbers, not {_what(node)}")


def _what(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return f"the constant {node.value!r}"
    return {ast.Call: "a call", ast.Attribute: "an attribute", ast.Subscript: "a subscript",
            ast.BinOp: "arithmetic", ast.Lambda: "a lambda"}.get(type(node), f"a {type(node).__name__} expression")


def _evaluate(node: ast.AST, scores: Mapping[str, float]) -> object:
    """Evaluate a checked expression (only the node kinds `_check` lets through)."""
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(v, scores) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, scores)
        return {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}[type(node.op)](value)
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, scores)
        for op, comparator in zip(node.ops, node.comparators):
            right = _evaluate(comparator, scores)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return float(scores[node.id])
    return node.value  # type: ignore[attr-defined] - a number
