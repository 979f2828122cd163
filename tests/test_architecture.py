"""The module structure docs/architecture.md describes: no import cycles, and the
worker side (`fluxgate/`) never imports the master side (`supervisor/`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"fluxgate": ROOT / "fluxgate", "fluxgate_supervisor": ROOT / "supervisor"}


def imports_of(package: str, path: Path) -> set[str]:
    """Modules of our two packages that `path` imports (at run time or for typing)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the same package
                base = package if node.module is None else f"{package}.{node.module}"
                names = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
                names += [f"{node.module}.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {
        f"{package}.{path.stem}": path
        for package, folder in PACKAGES.items()
        for path in folder.glob("*.py")
        if path.stem != "__init__"
    }
    return {
        name: {m for m in imports_of(name.split(".")[0], path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_module_imports_another_that_imports_it_back() -> None:
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_the_worker_side_never_imports_the_master_side() -> None:
    offending = {
        name: sorted(m for m in deps if m.startswith("fluxgate_supervisor"))
        for name, deps in graph().items()
        if name.startswith("fluxgate.")
    }
    assert {k: v for k, v in offending.items() if v} == {}


def test_every_module_is_named_in_the_architecture_page() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text() + (ROOT / "README.md").read_text()
    missing = [
        f"{folder.name}/{path.name}"
        for folder in PACKAGES.values()
        for path in folder.glob("*.py")
        if path.stem != "__init__" and f"{folder.name}/{path.name}" not in page
    ]
    assert missing == []


DOCUMENTS = {"README": "README.md", "BENCHMARKS.md": "BENCHMARKS.md"} | {
    f"docs/{p.name}": f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")
}
REFERENCE = re.compile(r'(README|BENCHMARKS\.md|docs/[a-z]+\.md),? "([^"]{3,80})"')


def test_every_section_the_code_and_docs_point_at_exists() -> None:
    """A comment saying (BENCHMARKS.md, "X") is only as good as the heading X: a
    regenerated BENCHMARKS.md once dropped the one the code pointed at."""
    headings = {
        name: {
            line.lstrip("#").strip()
            for line in (ROOT / path).read_text().splitlines()
            if line.startswith("#")
        }
        for name, path in DOCUMENTS.items()
    }
    sources = [*ROOT.glob("fluxgate/*.py"), *ROOT.glob("supervisor/*.py"), *ROOT.glob("bench/*.py")]
    sources += [ROOT / path for path in DOCUMENTS.values()]
    missing = []
    for source in sources:
        # Comments wrap: join lines and drop comment markers first.
        text = re.sub(r"\s*\n\s*(#\s*)?", " ", source.read_text())
        for document, heading in REFERENCE.findall(text):
            if heading not in headings[document]:
                missing.append(f"{source.relative_to(ROOT)}: {document}, {heading!r}")
    assert missing == []
