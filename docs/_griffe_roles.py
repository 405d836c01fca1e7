"""A griffe extension for the API pages: Sphinx roles in jaxreg's docstrings become links.

jaxreg's docstrings are reST-flavoured (``:func:`minimize```, ``:class:`~jaxreg.grid.Grid```,
``double backticks``). Markdown renders double backticks as code already; the roles would
show up literally. This extension rewrites each role, before mkdocstrings parses the
docstring, into

- a cross-reference ``[`name`][canonical.path]`` when the target is a public object of a
  module that an ``api/*.md`` page renders (``::: module`` lines), so that the link
  resolves and ``mkdocs build --strict`` stays clean;
- plain code ``name`` otherwise (private helpers, modules without a page yet).

``~`` shortens the text to the last component, as in Sphinx. A paragraph ``::`` (reST's
literal-block marker) is dropped, and a trailing ``::`` becomes ``:``; the indented block
after it is a code block in Markdown too.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:py:)?(?:func|class|mod|meth|data|attr|obj|exc|const|type):`(?P<tilde>~?)(?P<body>[^`]+)`"
)
_DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.M)


def _documented_modules(pages: Path) -> tuple[str, ...]:
    """The objects rendered by ``::: path`` lines in the API pages."""
    found = set()
    for page in sorted(pages.glob("*.md")):
        found.update(_DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    return tuple(sorted(found))


def _fence_doctests(text: str) -> str:
    """Wrap each doctest (``>>>`` lines and their output, up to a blank line) in a
    ``pycon`` code fence; Markdown would otherwise run it into one paragraph."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    in_fence = False
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            in_fence = not in_fence
        if in_fence or not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        out.extend([f"{indent}```pycon", *(indent + b for b in block), f"{indent}```"])
    return "\n".join(out)


def _lookup(scope: griffe.Object, name: str):
    try:
        return scope[name]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


class SphinxRolesToLinks(griffe.Extension):
    """Rewrites the docstrings of a package once griffe has loaded all of it (names are
    resolved then). ``pages``: the folder of API pages, default ``docs/api`` beside this
    file. Rewriting is idempotent, so being called by both hooks below does no harm."""

    def __init__(self, pages: str | None = None) -> None:
        super().__init__()
        self.documented = _documented_modules(Path(pages) if pages else Path(__file__).resolve().parent / "api")

    # griffe >= 1.14 calls on_package; older versions on_package_loaded.
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._rewrite_tree(pkg, pkg)

    def on_package_loaded(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        self._rewrite_tree(pkg, pkg)

    # -- internals ------------------------------------------------------------------------
    def _rewrite_tree(self, obj: griffe.Object, root: griffe.Module) -> None:
        if obj.docstring is not None:
            obj.docstring.value = self._rewrite(obj.docstring.value, obj, root)
        for member in list(obj.members.values()):
            if not member.is_alias:  # aliases are rewritten where they are defined
                self._rewrite_tree(member, root)

    def _rewrite(self, text: str, obj: griffe.Object, root: griffe.Module) -> str:
        text = re.sub(r"(?m)^(\s*)::\s*$", "", text)
        text = re.sub(r"(?m)(\S)::\s*$", r"\1:", text)
        text = _ROLE.sub(lambda m: self._replacement(m, obj, root), text)
        return _fence_doctests(text)

    def _replacement(self, match: re.Match, obj: griffe.Object, root: griffe.Module) -> str:
        body = match.group("body").strip()
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
        target = explicit.group("target").strip() if explicit else body
        if explicit:
            title = explicit.group("title")
        elif match.group("tilde"):
            title = target.rsplit(".", 1)[-1]
        else:
            title = target
        path = self._resolve(target, obj, root)
        return f"[`{title}`][{path}]" if path else f"`{title}`"

    def _resolve(self, target: str, obj: griffe.Object, root: griffe.Module) -> str | None:
        """Canonical path of ``target`` seen from ``obj``, if it will have an anchor."""
        found = None
        if target == root.name:
            found = root
        elif target.startswith(root.name + "."):
            found = _lookup(root, target[len(root.name) + 1 :])
        else:
            scope = obj
            while scope is not None and found is None:
                found = _lookup(scope, target)
                scope = scope.parent
        if found is None:
            return None
        try:
            final = found.final_target if found.is_alias else found
        except (griffe.AliasResolutionError, griffe.CyclicAliasError):
            return None
        path = final.path
        if not any(path == page or path.startswith(page + ".") for page in self.documented):
            return None
        # Only public objects are rendered: every component below the page's object must
        # be public (in the module's __all__ where it has one, no leading underscore).
        node = final
        while node is not None and node.path not in self.documented:
            if not node.is_public:
                return None
            node = node.parent
        return path
