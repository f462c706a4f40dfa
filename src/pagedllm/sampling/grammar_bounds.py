"""Bounds on a structured-output grammar before the native compiler (llguidance) sees it.

llguidance walks a grammar recursively on the calling thread's stack: a JSON schema whose `$ref`s chain
~700 deep, or a Lark grammar whose rules chain ~2,500 deep, overflowed an 8 MiB stack and killed the
whole process (measured, llguidance 1.x). Real grammars nest a few dozen levels; these bounds refuse
anything past MAX_GRAMMAR_DEPTH levels with a 400 long before the native code is at risk.
Recursive grammars (a schema that refers to itself, a rule that calls itself) are fine: a reference
back to a node being walked adds no depth, as it adds none to the compiled grammar either.
"""

from __future__ import annotations

import json
import re

from ..sampling_params import StructuredOutputError, StructuredOutputParams

MAX_GRAMMAR_DEPTH = 256  # schema objects nested (through $refs), or Lark rules chained, at most

_RULE = re.compile(r"^\s*\??([A-Za-z_][A-Za-z0-9_]*)(?:\.-?\d+)?\s*:(?!:)", re.MULTILINE)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERALS = re.compile(r'"(?:[^"\\\n]|\\.)*"i?|/(?:[^/\\\n]|\\.)+/[imslux]*|//[^\n]*')


def check_grammar_bounds(params: StructuredOutputParams) -> None:
    """Raise StructuredOutputError when the grammar nests deeper than MAX_GRAMMAR_DEPTH."""
    if params.json is not None:
        schema = _parsed(params.json) if isinstance(params.json, str) else params.json
        _check_depth(schema_depth(schema), "json schema", "nests objects (with its $refs followed)")
    if params.grammar is not None:
        _check_depth(lark_depth(params.grammar), "grammar", "chains rules")
        for schema in embedded_schemas(params.grammar):
            _check_depth(schema_depth(schema), "grammar's %json schema", "nests objects (with its $refs followed)")


def _check_depth(depth: int, what: str, how: str) -> None:
    if depth > MAX_GRAMMAR_DEPTH:
        raise StructuredOutputError(f"structured output {what} {how} more than {MAX_GRAMMAR_DEPTH} deep")


def _parsed(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise StructuredOutputError("structured output json schema is not valid JSON") from None


def schema_depth(schema) -> int:
    """The deepest chain of nested objects in `schema`, local `$ref`s ("#/...") followed."""
    children = {}

    def kids(node) -> list:
        if id(node) not in children:
            values = list(node.values()) if isinstance(node, dict) else list(node)
            found = [v for v in values if isinstance(v, (dict, list))]
            ref = node.get("$ref") if isinstance(node, dict) else None
            target = _resolve(schema, ref) if isinstance(ref, str) else None
            children[id(node)] = found + ([target] if target is not None else [])
        return children[id(node)]

    return _longest_path(schema, kids, lambda node: isinstance(node, dict))


def _resolve(root, ref: str):
    """The node a local JSON pointer names, None for anything else (remote refs are llguidance's to refuse)."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node if isinstance(node, (dict, list)) else None


def lark_depth(grammar: str) -> int:
    """The longest chain of rule references in a Lark grammar (each rule named by its definitions)."""
    text = _LITERALS.sub(" ", grammar)  # strings, regexes and comments name no rules
    starts = [(m.start(), m.group(1)) for m in _RULE.finditer(text)]
    bodies: dict[str, set[str]] = {}
    for (start, name), (end, _) in zip(starts, starts[1:] + [(len(text), "")]):
        body = text[start:end].split(":", 1)[1]
        bodies.setdefault(name, set()).update(_NAME.findall(body))
    for name in bodies:
        bodies[name] &= bodies.keys()
    every = ""  # not a rule name: a root above every rule, so one memoised walk covers them all
    return _longest_path(every, lambda n: list(bodies) if n == every else list(bodies[n]), lambda n: n != every)


def embedded_schemas(grammar: str) -> list:
    """The JSON schemas written inline after `%json` in a Lark grammar."""
    schemas, decoder = [], json.JSONDecoder()
    for match in re.finditer(r"%json\s*", grammar):
        try:
            schemas.append(decoder.raw_decode(grammar, match.end())[0])
        except (ValueError, RecursionError):
            raise StructuredOutputError("structured output grammar: a %json schema is not valid JSON") from None
    return schemas


def _longest_path(root, children, counts) -> int:
    """Depth-first, without recursion: the most nodes for which `counts` holds on one path from `root`,
    each node's depth memoised; an edge back to a node on the current path (recursion) adds nothing."""
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node) if not isinstance(node, str) else node
        if expanded:
            on_path.discard(key)
            below = [depth.get(id(c) if not isinstance(c, str) else c, 0) for c in children(node)]
            depth[key] = int(counts(node)) + max(below, default=0)
            continue
        if key in depth or key in on_path:
            continue
        on_path.add(key)
        stack.append((node, True))
        stack += [(c, False) for c in children(node)
                  if (id(c) if not isinstance(c, str) else c) not in depth]
    return depth.get(id(root) if not isinstance(root, str) else root, 0)
