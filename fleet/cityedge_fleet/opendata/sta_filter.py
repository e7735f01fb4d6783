"""The ``$filter`` expressions the open-data API takes: a strict parser, no evaluation of
anything the client wrote.

Grammar (the subset of OGC SensorThings API v1.1 §9.3.3.5 that matters for time series)::

    expr    := or
    or      := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | "(" expr ")" | compare
    compare := operand OP operand          OP: eq ne gt ge lt le
    operand := property | literal
    literal := 'text' ('' escapes a quote) | number | datetime (ISO 8601 with a zone)
               | true | false

Rules, the first failure refuses (``FilterError``, answered 400):

1. the expression has at most ``max_chars`` characters and only the tokens above
   (no functions, no arithmetic, no ``$it``, no lambdas);
2. nesting of parentheses and ``not`` is at most ``max_depth``; at most ``max_terms``
   comparisons; a literal has at most ``max_literal`` characters, a number is finite;
3. a comparison has exactly one property (of those the entity set names in its
   ``schema``) and one literal of that property's type (text, number, integer or time);
4. the whole expression is boolean (``and``/``or``/``not`` over comparisons).

The parser builds a small tree (``Compare``, ``Not``, ``BoolOp``) whose literals are
Python values; ``matches`` evaluates it on an entity's properties and the observation
query turns it into SQL with bound parameters (``opendata.query``): no client text ever
reaches SQL. It recurses at most ``max_depth`` deep, so a hostile nesting is refused by
rule 2 long before Python's recursion limit.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cityedge_core.errors import PeerError

Type = Literal["text", "number", "integer", "time"]
OPS = ("eq", "ne", "gt", "ge", "lt", "le")
KEYWORDS = ("and", "or", "not", "true", "false", *OPS)
_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<lp>\()|(?P<rp>\))"
    r"|(?P<text>'(?:[^']|'')*')"
    r"|(?P<time>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:\d{2}))"
    r"|(?P<number>-?\d{1,40}(?:\.\d{1,40})?(?:[eE][+-]?\d{1,3})?)"
    r"|(?P<word>@iot\.id|[A-Za-z][A-Za-z0-9_]{0,63})"
)


class FilterError(PeerError):
    """The client's ``$filter`` breaks a rule (its message says which, never quoting it
    whole)."""


@dataclass(frozen=True)
class Compare:
    prop: str
    op: str
    value: Any  # str, float, int or an aware datetime (bool for true/false)


@dataclass(frozen=True)
class Not:
    arg: Node


@dataclass(frozen=True)
class BoolOp:
    op: Literal["and", "or"]
    left: Node
    right: Node


Node = Compare | Not | BoolOp


@dataclass(frozen=True)
class FilterLimits:
    max_chars: int = 1024
    max_depth: int = 16
    max_terms: int = 64
    max_literal: int = 128


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str


def tokenize(text: str, limits: FilterLimits) -> list[_Tok]:
    if len(text) > limits.max_chars:
        raise FilterError("$filter has more than %d characters" % limits.max_chars)
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise FilterError("$filter: unexpected character at position %d" % pos)
        kind = m.lastgroup or ""
        if kind != "space":
            tok = m.group()
            if kind in ("text", "number", "time") and len(tok) > limits.max_literal:
                raise FilterError("$filter: a literal has more than %d characters"
                                  % limits.max_literal)
            out.append(_Tok(kind, tok))
        pos = m.end()
    return out


class _Parser:
    def __init__(self, toks: list[_Tok], schema: Mapping[str, Type],
                 limits: FilterLimits) -> None:
        self.toks = toks
        self.i = 0
        self.schema = schema
        self.limits = limits
        self.terms = 0

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def next(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise FilterError("$filter ends too early")
        self.i += 1
        return tok

    def word(self, tok: _Tok | None, *words: str) -> bool:
        return tok is not None and tok.kind == "word" and tok.text in words

    def expr(self, depth: int) -> Node:
        left = self.conj(depth)
        while self.word(self.peek(), "or"):
            self.i += 1
            left = BoolOp("or", left, self.conj(depth))
        return left

    def conj(self, depth: int) -> Node:
        left = self.unary(depth)
        while self.word(self.peek(), "and"):
            self.i += 1
            left = BoolOp("and", left, self.unary(depth))
        return left

    def unary(self, depth: int) -> Node:
        if depth >= self.limits.max_depth:
            raise FilterError("$filter nests deeper than %d" % self.limits.max_depth)
        tok = self.peek()
        if self.word(tok, "not"):
            self.i += 1
            return Not(self.unary(depth + 1))
        if tok is not None and tok.kind == "lp":
            self.i += 1
            node = self.expr(depth + 1)
            if self.next().kind != "rp":
                raise FilterError("$filter: a parenthesis is not closed")
            return node
        return self.compare()

    def compare(self) -> Compare:
        left = self.next()
        op = self.next()
        if not self.word(op, *OPS):
            raise FilterError("$filter: expected one of %s after an operand"
                              % ", ".join(OPS))
        right = self.next()
        self.terms += 1
        if self.terms > self.limits.max_terms:
            raise FilterError("$filter has more than %d comparisons" % self.limits.max_terms)
        if self._is_property(left) and not self._is_property(right):
            return Compare(left.text, op.text, self.literal(right, self.schema[left.text]))
        if self._is_property(right) and not self._is_property(left):
            flipped = {"gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}.get(op.text, op.text)
            return Compare(right.text, flipped, self.literal(left, self.schema[right.text]))
        raise FilterError("$filter: a comparison takes one property of %s and one literal"
                          % ", ".join(sorted(self.schema)))

    def _is_property(self, tok: _Tok) -> bool:
        if tok.kind != "word" or tok.text in KEYWORDS:
            return False
        if tok.text not in self.schema:
            raise FilterError("$filter: unknown property; one of %s"
                              % ", ".join(sorted(self.schema)))
        return True

    def literal(self, tok: _Tok, want: Type) -> Any:
        if tok.kind == "text" and want == "text":
            return tok.text[1:-1].replace("''", "'")
        if tok.kind == "number" and want in ("number", "integer"):
            value = float(tok.text)
            if not math.isfinite(value):
                raise FilterError("$filter: a number is not finite")
            if want == "integer":
                if not value.is_integer() or abs(value) > 2**63 - 1:
                    raise FilterError("$filter: this property takes an integer")
                return int(value)
            return value
        if tok.kind == "time" and want == "time":
            try:
                when = dt.datetime.fromisoformat(tok.text.replace("Z", "+00:00"))
            except (ValueError, OverflowError) as e:
                raise FilterError("$filter: not a valid date and time") from e
            try:
                return when.astimezone(dt.UTC)
            except OverflowError as e:
                raise FilterError("$filter: a date and time out of range") from e
        raise FilterError("$filter: this property takes a %s literal" % want)


def parse(text: str, schema: Mapping[str, Type], limits: FilterLimits) -> Node:
    """The tree of ``text`` over the properties of ``schema``; ``FilterError`` otherwise."""
    toks = tokenize(text, limits)
    if not toks:
        raise FilterError("$filter is empty")
    parser = _Parser(toks, schema, limits)
    node = parser.expr(0)
    if parser.i != len(toks):
        raise FilterError("$filter: unexpected text after position %d of its tokens"
                          % parser.i)
    return node


def matches(node: Node, props: Mapping[str, Any]) -> bool:
    """Does an entity with these property values satisfy ``node``? (None never compares.)"""
    if isinstance(node, BoolOp):
        if node.op == "and":
            return matches(node.left, props) and matches(node.right, props)
        return matches(node.left, props) or matches(node.right, props)
    if isinstance(node, Not):
        return not matches(node.arg, props)
    have = props.get(node.prop)
    if have is None:
        return False
    return bool(compare(have, node.op, node.value))


def compare(have: Any, op: str, want: Any) -> Any:
    if op == "eq":
        return have == want
    if op == "ne":
        return have != want
    if op == "gt":
        return have > want
    if op == "ge":
        return have >= want
    if op == "lt":
        return have < want
    return have <= want
