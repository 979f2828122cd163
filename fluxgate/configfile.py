"""Reading the configuration file: bytes on disk to a validated `Config`.

Three steps, each usable on its own by the supervisor and the CLI:
`read_config_bytes` (file problems -> `ConfigFileError` with a `.reason`),
`parse_config_bytes` (any bytes at all -> `LoadedConfig` or `ConfigInvalid`
listing every problem), and `load_config_file`, which does both.

The YAML loader is stricter than `yaml.safe_load`: a key written twice in one
mapping is an error (safe_load silently keeps the last one, which is how a
pasted second `api_key:` goes unnoticed), and aliases may not build a
structure that explodes in size ("billion laughs") or refers to itself.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import Resolver
from yaml.scanner import Scanner

from fluxgate.checks import field_path
from fluxgate.config import Config, build_config
from fluxgate.validation import validate

MAX_CONFIG_BYTES = 10 * 1024 * 1024
# How many nodes aliases may add on top of those written in the file; far
# beyond any real use of anchors, far below what would stall validation.
MAX_ALIAS_EXPANSION = 1_000_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
_READ_CHUNK = 1 << 20

StrPath = str | os.PathLike[str]


class ConfigFileError(Exception):
    """The file itself could not be used; `.reason` names the condition.

    Reasons: "missing", "is_directory", "permission_denied", "unreadable",
    "too_large", "not_utf8". The message starts with the path.
    """

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail


class ConfigInvalid(Exception):
    """The content was rejected; `.errors` holds every problem, one per item."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    doc: dict[str, Any]
    digest: str  # sha256 hex of the file bytes, to tell a real change from a touch


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _os_error(path: str, exc: OSError) -> ConfigFileError:
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return ConfigFileError(path, "missing", "no such file")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return ConfigFileError(path, "permission_denied", "permission denied")
    if exc.errno == errno.EISDIR:
        return ConfigFileError(path, "is_directory", "is a directory, not a file")
    return ConfigFileError(path, "unreadable", f"cannot be read: {exc.strerror or exc}")


def _too_large(path: str) -> ConfigFileError:
    limit = MAX_CONFIG_BYTES // (1024 * 1024)
    return ConfigFileError(path, "too_large", f"is larger than the {limit} MiB limit")


def read_config_bytes(path: StrPath) -> bytes:
    """The file's bytes; raises `ConfigFileError`. Never reads more than the cap + 1 byte."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: opening a FIFO put in place of the file must not hang.
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _os_error(name, exc) from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigFileError(name, "is_directory", "is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigFileError(name, "unreadable", "is not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise _too_large(name)
        chunks: list[bytes] = []
        total = 0
        # The size may have changed since fstat: the read itself is bounded too.
        while total <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, min(_READ_CHUNK, MAX_CONFIG_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_CONFIG_BYTES:
            raise _too_large(name)
        return b"".join(chunks)
    except OSError as exc:
        raise _os_error(name, exc) from exc
    finally:
        os.close(fd)


def _decode(data: bytes) -> tuple[str | None, str]:
    """(text, "") or (None, why it is not UTF-8)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None, "is UTF-16 encoded; save it as UTF-8"
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return None, f"is not valid UTF-8 (byte offset {exc.start}, line {line})"


class _StrictLoader(Composer, SafeConstructor, Resolver):
    """A safe loader that reports duplicate keys and alias bombs instead of accepting them.

    Subclasses add the event parser. The composer is always PyYAML's Python
    one: libyaml's (as in CSafeLoader) recurses in C and crashes the process
    with a segfault on deeply nested input such as 200,000 "[", where the
    Python one raises RecursionError, which is caught.
    """

    def dispose(self) -> None:  # provided by the parser half
        raise NotImplementedError

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as exc:
            # e.g. a timestamp such as 2024-13-45: safe_load would raise a
            # bare ValueError; turn it into a located YAML error instead.
            tag = node.tag.rsplit(":", 1)[-1]
            raise ConstructorError(None, None, f"invalid {tag} value", node.start_mark) from exc

    def alias_problem(self, root: Node) -> str | None:
        """Why the node graph is unsafe to walk, or None."""
        distinct: set[int] = set()
        pending: list[Node] = [root]
        while pending:
            node = pending.pop()
            if id(node) not in distinct:
                distinct.add(id(node))
                pending.extend(_children(node))
        limit = len(distinct) + MAX_ALIAS_EXPANSION
        sizes: dict[int, int] = {}
        in_progress: set[int] = set()  # the current chain of ancestors
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, finished = stack.pop()
            if finished:
                sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
                in_progress.discard(id(node))
                if sizes[id(node)] > limit:
                    return "aliases expand the document too much"
            elif id(node) in in_progress:
                return "an alias refers to a node that contains it"
            elif id(node) not in sizes:
                in_progress.add(id(node))
                stack.append((node, True))
                stack.extend((child, False) for child in _children(node))
        return None

    def duplicate_keys(self, root: Node) -> list[str]:
        found: list[tuple[int, str]] = []
        visited: set[int] = set()
        stack: list[tuple[Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            if id(node) in visited or isinstance(node, ScalarNode):
                continue
            visited.add(id(node))
            if isinstance(node, SequenceNode):
                stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node.value))
                continue
            first_line: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    stack.append((value_node, field_path(path, "<<")))
                    continue
                key = self._scalar_key(key_node)
                child_path = field_path(path, key if key is not None else "?")
                stack.append((value_node, child_path))
                if key is None:
                    continue
                line = key_node.start_mark.line + 1
                if key in first_line:
                    message = (
                        f"{child_path}: duplicate key (line {line}; first "
                        f"on line {first_line[key]}); only one of them would be used"
                    )
                    found.append((line, message))
                else:
                    first_line[key] = line
        return [message for _line, message in sorted(found)]

    def _scalar_key(self, key_node: Node) -> Any:
        if not isinstance(key_node, ScalarNode):
            return None  # a collection key is unhashable: construction reports it
        try:
            key = self.construct_object(key_node, deep=True)
            hash(key)
        except Exception:  # reported with its location when the document is built
            return None
        return key


class _PureLoader(Reader, Scanner, Parser, _StrictLoader):
    def __init__(self, text: str) -> None:
        Reader.__init__(self, text)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)


_Loader: Callable[[str], _StrictLoader] = _PureLoader
_BYTE_OFFSETS = False  # how the parser counts ReaderError.position
try:  # libyaml's event parser, when PyYAML was built with it: several times faster
    from yaml._yaml import CParser

    class _FastLoader(_StrictLoader, CParser):
        def __init__(self, text: str) -> None:
            CParser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

        def dispose(self) -> None:
            CParser.dispose(self)

    _Loader, _BYTE_OFFSETS = _FastLoader, True
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    pass


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [child for pair in node.value for child in pair]
    return []


def _char_at(text: str, line: int, column: int) -> str:
    lines = text.split("\n", line + 1)
    return lines[line][column : column + 1] if line < len(lines) else ""


def _yaml_error(exc: yaml.YAMLError, text: str, byte_offsets: bool) -> str:
    # Built from the parts, not str(exc): that would quote the offending
    # line, which may hold a secret.
    if isinstance(exc, ReaderError):
        before = text.encode()[: exc.position].decode(errors="ignore") if byte_offsets else text
        position = len(before) if byte_offsets else exc.position
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or "?")
        return f"line {line}, column {column}: invalid YAML: character U+{char:04X} is not allowed"
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(yaml)"
        what = exc.problem or exc.context or "invalid YAML"
        if mark and _char_at(text, mark.line, mark.column) == "\t":
            # The parsers' own words ("cannot start any token") do not say it.
            return f"{where}: invalid YAML: a tab character; YAML indents with spaces only"
        if exc.problem and exc.context:
            context_line = f" on line {exc.context_mark.line + 1}" if exc.context_mark else ""
            what = f"{what} ({exc.context}{context_line})"
        return f"{where}: invalid YAML: {what}"
    return f"(yaml): invalid YAML ({type(exc).__name__})"


def _load_yaml(text: str) -> tuple[object, list[str], bool]:
    """(document, problems, usable): usable is False when nothing could be built."""
    loader: _StrictLoader | None = None
    try:
        loader = _Loader(text)  # may already reject unprintable characters
        root = loader.get_single_node()
        if root is None:
            return None, [], True
        problem = loader.alias_problem(root)
        if problem is not None:
            return None, [f"(yaml): {problem}"], False
        duplicates = loader.duplicate_keys(root)
        return loader.construct_document(root), duplicates, True
    except yaml.YAMLError as exc:
        return None, [_yaml_error(exc, text, _BYTE_OFFSETS)], False
    except RecursionError:
        return None, ["(yaml): the document is nested too deeply"], False
    finally:
        if loader is not None:
            loader.dispose()


def parse_config_bytes(data: bytes, generation: int = 0) -> LoadedConfig:
    """Validate and build a configuration from file bytes; raises only `ConfigInvalid`."""
    digest = sha256_hex(data)
    text, why = _decode(data)
    if text is None:
        raise ConfigInvalid([f"(file): {why}"])
    try:
        doc, errors, usable = _load_yaml(text)
        if not usable:
            raise ConfigInvalid(errors)
        errors += validate(doc)
        if errors:
            raise ConfigInvalid(errors)
        assert isinstance(doc, dict)  # validate() accepts nothing else
        config = build_config(doc, generation)
    except ConfigInvalid:
        raise
    except Exception as exc:  # a bug; the exception text could hold a secret
        problem = f"(internal): the configuration could not be built ({type(exc).__name__})"
        raise ConfigInvalid([problem]) from exc
    return LoadedConfig(config=config, doc=doc, digest=digest)


def load_config_file(path: StrPath, generation: int = 0) -> LoadedConfig:
    """Read, validate and build; raises `ConfigFileError` or `ConfigInvalid`."""
    data = read_config_bytes(path)
    text, why = _decode(data)
    if text is None:
        raise ConfigFileError(os.fspath(path), "not_utf8", why)
    return parse_config_bytes(data, generation)
