"""YAML reading that remembers where every value came from.

Spec files are edited by hand, so every error must name the file and line of the offending
key. ``yaml.safe_load`` forgets positions; here the document is composed with PyYAML's safe
loader (no tags, no Python objects) and turned into plain dicts/lists while the line of each
key path is recorded. Duplicate keys, which YAML silently collapses, are rejected.

Anchors and aliases are allowed, but a document may expand to at most ``MAX_NODES`` nodes: a
few nested aliases can otherwise stand for billions of nodes (an "alias bomb") and exhaust
memory minutes later. The size is counted while composing, before anything is expanded.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class SpecError(Exception):
    """A spec file is wrong. The message names file, line, key, what was found and what is allowed."""

    def __init__(self, file: Path | str, line: int | None, key: str, found: Any, allowed: str):
        self.file, self.line, self.key, self.found, self.allowed = str(file), line, key, found, allowed
        where = f"{file}:{line}" if line else f"{file}"
        found_s = found if isinstance(found, str) and found.startswith("<") else repr(found)
        super().__init__(f"{where}: {key}: found {found_s}; {allowed}")


@dataclass
class Source:
    """A loaded YAML document plus the line of every key path (tuple of keys/indices)."""

    path: Path
    data: Any
    lines: dict[tuple, int] = field(default_factory=dict)

    def line(self, keypath: tuple) -> int | None:
        """Line of ``keypath``, or of its nearest recorded ancestor."""
        while keypath:
            if keypath in self.lines:
                return self.lines[keypath]
            keypath = keypath[:-1]
        return self.lines.get((), 1)

    def error(self, keypath: tuple, found: Any, allowed: str) -> SpecError:
        key = ".".join(str(k) for k in keypath) or "<document>"
        return SpecError(self.path, self.line(keypath), key, found, allowed)


_constructor = yaml.constructor.SafeConstructor()

# The largest spec (models/llama.yaml) is about 1,300 nodes; this leaves room for growth and for
# anchors, and expands in well under a second.
MAX_NODES = 100_000


class _TooLarge(Exception):
    def __init__(self, line: int, problem: str):
        self.line, self.problem = line, problem


class _Loader(yaml.SafeLoader):
    """The safe loader, counting the nodes the document stands for once every alias is expanded.

    An alias adds the expanded size of the node it names, known because that node was composed
    before it; an alias to a node still being composed (a recursive anchor) has no finite size."""

    def __init__(self, stream):
        super().__init__(stream)
        self._sizes: dict[int, int] = {}
        self._expanded = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = super().compose_node(parent, index)
            line = event.start_mark.line + 1
            if id(node) not in self._sizes:
                raise _TooLarge(line, f"<the alias *{event.anchor}, which refers to a node that contains it>")
            self._expanded += self._sizes[id(node)]
            if self._expanded > MAX_NODES:
                raise _TooLarge(line, f"<the alias *{event.anchor}, which makes the document expand past {MAX_NODES} nodes>")
            return node
        node = super().compose_node(parent, index)
        if isinstance(node, yaml.MappingNode):
            size = 1 + sum(self._sizes[id(k)] + self._sizes[id(v)] for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            size = 1 + sum(self._sizes[id(v)] for v in node.value)
        else:
            size = 1
        self._expanded += 1
        if self._expanded > MAX_NODES:
            raise _TooLarge(node.start_mark.line + 1, f"<a document of more than {MAX_NODES} nodes>")
        self._sizes[id(node)] = size
        return node


_PLAIN_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "seq", "map")}


def _build(node: yaml.Node, path: tuple, src: Source) -> Any:
    src.lines.setdefault(path, node.start_mark.line + 1)
    if node.tag not in _PLAIN_TAGS:
        raise SpecError(src.path, node.start_mark.line + 1, ".".join(map(str, path)) or "<document>",
                        f"<the tag {node.tag}>", "plain YAML scalars, lists and mappings only (no tags)")
    if isinstance(node, yaml.MappingNode):
        out: dict = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise src.error(path, "<a non-scalar key>", "keys must be plain names")
            key = _constructor.construct_object(knode)
            if key in out:
                raise SpecError(src.path, knode.start_mark.line + 1, ".".join(map(str, path + (key,))),
                                "<a duplicate key>", f"each key may appear once (first at line {src.lines[path + (key,)]})")
            src.lines[path + (key,)] = knode.start_mark.line + 1
            out[key] = _build(vnode, path + (key,), src)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(v, path + (i,), src) for i, v in enumerate(node.value)]
    return _constructor.construct_object(node)


def load(path: Path) -> Source:
    """Read one spec file; YAML syntax errors become SpecErrors with the file and line."""
    src = Source(path=path, data=None)
    try:
        # Checked before opening: reading /dev/zero never ends, and opening a FIFO blocks.
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
                    "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
                    "not a regular file")
            raise SpecError(path, None, "<file>", f"<{kind}>", "a spec must be a regular YAML file")
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=_Loader)
    except _TooLarge as e:
        raise SpecError(path, e.line, "<yaml>", e.problem,
                        f"a spec may stand for at most {MAX_NODES} nodes once its aliases are expanded, "
                        "and an alias may not refer to a node that contains it") from None
    except OSError as e:
        raise SpecError(path, None, "<file>", "<unreadable>", str(e)) from None
    except UnicodeDecodeError as e:
        raise SpecError(path, None, "<file>", "<bytes that are not UTF-8>", f"spec files are UTF-8 text ({e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SpecError(path, mark.line + 1 if mark else None, "<yaml>",
                        f"<{getattr(e, 'problem', None) or e}>", "the file must be valid YAML") from None
    if node is None:
        raise SpecError(path, 1, "<document>", "<an empty file>", "a YAML mapping")
    try:
        src.data = _build(node, (), src)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        raise SpecError(path, mark.line + 1 if mark else None, "<yaml>", f"<{e.problem}>",
                        "plain YAML scalars, lists and mappings only (no tags)") from None
    return src
