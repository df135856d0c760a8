"""Keep the Markdown pages self-contained: code blocks copied from the example files, and
the API reference written out from the docstrings.

The pages must read on GitHub as they do on the site, so they hold their code themselves
instead of include directives. A block that shows an example file is marked with a comment
on the line before its fence:

    <!-- example: docs/examples/quickstart.py -->            the whole file
    <!-- example: docs/examples/nodes.py:signal -->          one section of it

A section is the text between `# --8<-- [start:NAME]` and `# --8<-- [end:NAME]` in the
file, dedented. `docs/reference.md` is generated from the public names' signatures and
docstrings. `tests/integration/test_docs_examples.py` fails when a page is out of date;
`python docs/sync_docs.py` rewrites the pages (run it after editing an example or a
docstring).
"""

from __future__ import annotations

import enum
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference.md"

MARKER = re.compile(r"^<!-- example: (?P<path>[^\s:]+)(?::(?P<section>[\w-]+))? -->$")
SECTION_LINE = re.compile(r"^\s*# --8<-- \[(?:start|end):[\w-]+\]\s*$")


def section(path: str, name: str | None) -> str:
    """The text a marked block must hold: the file, or its section `name`, dedented."""
    lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
    if name is not None:
        start = next(
            (i for i, ln in enumerate(lines) if ln.strip() == f"# --8<-- [start:{name}]"), None
        )
        end = next(
            (i for i, ln in enumerate(lines) if ln.strip() == f"# --8<-- [end:{name}]"), None
        )
        if start is None or end is None or end < start:
            raise ValueError(f"{path} has no section {name!r}")
        lines = lines[start + 1 : end]
    # Section markers of other sections are noise to a reader.
    kept = "\n".join(ln for ln in lines if not SECTION_LINE.match(ln))
    # A dropped marker can leave more blank lines than the formatter would.
    return re.sub(r"\n{4,}", "\n\n\n", textwrap.dedent(kept)).strip("\n")


def sync_page(text: str) -> str:
    """`text` with every marked code block replaced by what its markers name.

    Several marker lines in a row fill one block, their texts separated by a blank line.
    """
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        i += 1
        if not MARKER.match(line.strip()) or (i < len(lines) and MARKER.match(lines[i].strip())):
            continue
        markers = []
        back = len(out) - 1
        while back >= 0 and (match := MARKER.match(out[back].strip())):
            markers.insert(0, match)
            back -= 1
        if i >= len(lines) or not lines[i].lstrip().startswith("```"):
            raise ValueError(f"{line.strip()} is not followed by a code block")
        fence = lines[i]
        indent = fence[: len(fence) - len(fence.lstrip())]
        close = i + 1
        while close < len(lines) and lines[close].strip() != "```":
            close += 1
        body = "\n\n".join(section(m["path"], m["section"]) for m in markers)
        out.append(fence)
        out.extend(indent + ln if ln else "" for ln in body.splitlines())
        out.append(indent + "```")
        i = close + 1
    return "\n".join(out) + "\n"


def marked_examples(text: str) -> Iterator[str]:
    """The example files a page's markers name."""
    for line in text.splitlines():
        match = MARKER.match(line.strip())
        if match:
            yield match["path"]


# -- the API reference ------------------------------------------------------------------------


# (heading, [(import path, object)]) in page order; every name in durable.__all__ must be here.
def _groups() -> list[tuple[str, list[tuple[str, Any]]]]:
    import durable
    import durable.context
    import durable.testing
    from durable import server

    errors = sorted(
        (
            name
            for name in durable.__all__
            if isinstance(getattr(durable, name), type)
            and issubclass(getattr(durable, name), durable.DurableError)
        ),
        key=lambda n: (n != "DurableError", n),
    )
    return [
        ("Running workflows", [("durable.Engine", durable.Engine)]),
        (
            "Defining workflows",
            [
                ("durable.Workflow", durable.Workflow),
                ("durable.Node", durable.Node),
                ("durable.Step", durable.Step),
                ("durable.default_backoff", durable.default_backoff),
                ("durable.exponential", durable.exponential),
            ],
        ),
        (
            "Flow control",
            [
                ("durable.Limit", durable.Limit),
                ("durable.Debounce", durable.Debounce),
                ("durable.LimitUsage", durable.LimitUsage),
            ],
        ),
        (
            "Inside a handler",
            [
                ("durable.Context", durable.Context),
                ("durable.context.LoopContext", durable.context.LoopContext),
                ("durable.SyncContext", durable.SyncContext),
                ("durable.SyncLoopContext", durable.SyncLoopContext),
                ("durable.SyncConnection", durable.SyncConnection),
            ],
        ),
        (
            "Inspecting runs",
            [
                ("durable.Run", durable.Run),
                ("durable.RunStatus", durable.RunStatus),
                ("durable.JournalEntry", durable.JournalEntry),
                ("durable.Attempt", durable.Attempt),
                ("durable.RunFilter", durable.RunFilter),
            ],
        ),
        ("The admin app", [("durable.web.admin_app", _admin_app())]),
        (
            "Versions and deploys",
            [
                ("durable.CheckReport", durable.CheckReport),
                ("durable.StrandedRuns", durable.StrandedRuns),
                ("durable.ShapeDiff", durable.ShapeDiff),
                ("durable.UpgradeReport", durable.UpgradeReport),
                ("durable.UpgradeRefusal", durable.UpgradeRefusal),
            ],
        ),
        (
            "Schedules",
            [
                ("durable.Schedule", durable.Schedule),
                ("durable.ScheduleInfo", durable.ScheduleInfo),
            ],
        ),
        (
            "History partitions",
            [
                ("durable.HistoryPartition", durable.HistoryPartition),
                ("durable.HistoryDrop", durable.HistoryDrop),
            ],
        ),
        ("Errors", [(f"durable.{n}", getattr(durable, n)) for n in errors]),
        (
            "Testing",
            [
                ("durable.testing.Harness", durable.testing.Harness),
                ("durable.testing.VirtualClock", durable.testing.VirtualClock),
            ],
        ),
        (
            "A throwaway PostgreSQL",
            [("durable.server.LocalPostgres", server.LocalPostgres)],
        ),
    ]


def _admin_app() -> Any:
    from durable.web import admin_app

    return admin_app


def _doc(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip()


def _signature(name: str, obj: Callable[..., Any], *, keyword: str = "def") -> str:
    """`keyword name(params) -> returns`, annotations as written, `self` left out; one
    parameter per line when it would not fit in 88 columns (pages must not scroll)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"{keyword} {name}"

    def text(annotation: Any) -> str:
        return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)

    params: list[str] = []
    star_done = False
    for p in sig.parameters.values():
        if p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not star_done:
            params.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        item = prefix + p.name
        if p.annotation is not p.empty:
            item += f": {text(p.annotation)}"
        if p.default is not p.empty:
            # A sentinel's repr carries its address, which changes on every run.
            default = "<unset>" if " at 0x" in repr(p.default) else repr(p.default)
            item += f" = {default}" if p.annotation is not p.empty else f"={default}"
        params.append(item)
    returns = ""
    if sig.return_annotation is not sig.empty and keyword != "class":
        returns = f" -> {text(sig.return_annotation)}"
    one_line = f"{keyword} {name}({', '.join(params)}){returns}"
    if len(one_line) <= 88:
        return one_line
    body = "".join(f"    {item},\n" for item in params)
    return f"{keyword} {name}(\n{body}){returns}"


def _members(cls: type) -> Iterator[tuple[str, Any]]:
    """Public members of `cls` and of its durable base classes, in source order."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("durable"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            if isinstance(value, property | staticmethod | classmethod) or inspect.isfunction(
                value
            ):
                seen.add(name)
                yield name, value


def _render_object(path: str, obj: Any) -> list[str]:
    short = path.rsplit(".", 1)[1]
    lines = [f"### {path}", ""]
    if inspect.isclass(obj) and issubclass(obj, enum.Enum):
        lines += [_doc(obj), "", "| Member | Value |", "|---|---|"]
        lines += [f"| `{m.name}` | `{m.value!r}` |" for m in obj]
        return [*lines, ""]
    if inspect.isclass(obj):
        if "__init__" in vars(obj) or not issubclass(obj, Exception):
            lines += ["```python", _signature(short, obj, keyword="class"), "```", ""]
        lines += [_doc(obj), ""]
        for name, member in _members(obj):
            if isinstance(member, property):
                lines += [f"**`{short.lower()}.{name}`** (property)", ""]
                doc = _doc(member)
            else:
                func = member.__func__ if isinstance(member, staticmethod | classmethod) else member
                keyword = "async def" if inspect.iscoroutinefunction(func) else "def"
                lines += ["```python", _signature(name, func, keyword=keyword), "```", ""]
                doc = _doc(func)
            if doc:
                lines += [doc, ""]
        return lines
    keyword = "async def" if inspect.iscoroutinefunction(obj) else "def"
    lines += ["```python", _signature(short, obj, keyword=keyword), "```", "", _doc(obj), ""]
    return lines


def reference() -> str:
    """The text of docs/reference.md."""
    lines = [
        "<!-- Generated by `python docs/sync_docs.py` from the docstrings: do not edit. -->",
        "",
        "# API reference",
        "",
        "Everything here is importable from `durable`, except the testing harness",
        "(`durable.testing`, also a pytest plugin) and `LocalPostgres` (`durable.server`).",
        "Every error durable raises is a `DurableError`.",
        "",
    ]
    for heading, objects in _groups():
        lines += [f"## {heading}", ""]
        for path, obj in objects:
            lines += _render_object(path, obj)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def pages() -> list[Path]:
    """Every Markdown page under docs/, and the README."""
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def main() -> int:
    """Rewrite every out-of-date page; print what changed."""
    changed = 0
    for page in pages():
        text = page.read_text(encoding="utf-8")
        new = reference() if page == REFERENCE else sync_page(text)
        if new != text:
            page.write_text(new, encoding="utf-8")
            print(f"updated {page.relative_to(ROOT)}")
            changed += 1
    if not changed:
        print("every page is up to date")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
