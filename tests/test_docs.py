"""The documentation's code runs as written.

Each page of ``docs/`` (not the generated API pages) is one test. Its ```python blocks
run in order in one namespace, in a temporary folder that holds the ``demo/inputs``
files the pages use (made here as ``jaxreg demo`` makes them).

Pages whose examples run registrations or gradient checks (``EXPENSIVE``) spend most
of their time compiling, half a minute to a minute each on 2 CPU cores: they run in full
only with ``JAXREG_DOCS_EXAMPLES=all``. Otherwise every block of theirs is still
compiled, and its references into jaxreg (and ``tests.helpers``) are checked against the
code: each imported name and each ``jaxreg.x.y`` attribute exists, and each call of such
a function passes arguments its signature accepts. Every ``jaxreg`` command line in a
```bash block is parsed by the command's own parser. A renamed function, keyword or
command-line option breaks the test either way.

A block preceded by ``<!-- docs-test: skip -->`` is not run. A block that needs an
optional package that is not installed (torch, ANTsPy) is skipped and the page goes on.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import shlex
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxreg
from jaxreg import cli, synthetic
from jaxreg.transforms import rotation_matrix

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
EXPENSIVE = {"quickstart.md", "registration.md", "population.md", "extending.md", "training.md"}
OPTIONAL_MODULES = {"torch", "ants"}
CHECKED_PACKAGES = {"jaxreg", "tests"}


def _blocks(page: str, language: str) -> list[tuple[int, str, bool]]:
    """``(line, code, skip)`` for each block of ``language`` in ``docs/<page>``."""
    pattern = rf"(?P<skip><!-- docs-test: skip -->\s*\n)?^```{language}[^\n]*\n(?P<code>.*?)^```"
    text = (DOCS / page).read_text(encoding="utf-8")
    return [
        (text[: m.start("code")].count("\n") + 1, m.group("code"), bool(m.group("skip")))
        for m in re.finditer(pattern, text, re.M | re.S)
    ]


def python_blocks(page: str) -> list[tuple[int, str, bool]]:
    return _blocks(page, "python")


def jaxreg_command_lines(page: str) -> list[tuple[int, list[str]]]:
    """The argument lists of the ``jaxreg ...`` commands in the bash blocks of a page."""
    found = []
    for line, code, _ in _blocks(page, "bash"):
        for command in code.replace("\\\n", " ").splitlines():
            for part in command.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] == "jaxreg":
                    found.append((line, words[1:]))
    return found


def write_demo_inputs(folder: Path, size: int = 32, seed: int = 0):
    """``fixed``, ``moving`` and their label maps, as ``jaxreg demo`` writes them: blobs
    moved by a small affine and a random stationary velocity field, 1 mm voxels."""
    affine = np.eye(4, dtype=np.float32)
    affine[:3, 3] = -(size - 1) / 2.0
    grid = jaxreg.Grid((size,) * 3, affine)
    key_image, key_warp = jax.random.split(jax.random.PRNGKey(seed))
    image, labels = synthetic.blobs(key_image, grid.shape, labels=4)
    velocity = synthetic.random_velocity(key_warp, grid, amplitude=0.06 * size, smoothness=0.25 * size)
    linear = 1.03 * rotation_matrix(jnp.full(3, np.deg2rad(4.0)), 3)
    truth = jaxreg.compose(jaxreg.Affine.from_linear(linear, jnp.full(3, 0.03 * size)), velocity)
    fixed, fixed_labels = jaxreg.Image(image, affine), jaxreg.Image(labels, affine)
    folder.mkdir(parents=True, exist_ok=True)
    jaxreg.save(fixed, folder / "fixed.nii.gz")
    jaxreg.save(fixed_labels, folder / "fixed_labels.nii.gz")
    jaxreg.save(jaxreg.warp(fixed, truth), folder / "moving.nii.gz")
    jaxreg.save(jaxreg.warp(fixed_labels, truth, order=0), folder / "moving_labels.nii.gz")


# -- checks without running ----------------------------------------------------------------


class _References(ast.NodeVisitor):
    """Resolves names bound by imports of jaxreg and checks what the code uses of them."""

    def __init__(self, where: str):
        self.where = where
        self.bound: dict[str, object] = {}
        self.problems: list[str] = []

    def _say(self, node, message):
        self.problems.append(f"{self.where}, block line {node.lineno}: {message}")

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.split(".")[0] in CHECKED_PACKAGES:
                module = importlib.import_module(alias.name)
                top = alias.name.split(".")[0]
                self.bound[alias.asname or top] = module if alias.asname else importlib.import_module(top)

    def visit_ImportFrom(self, node):
        if not node.module or node.module.split(".")[0] not in CHECKED_PACKAGES:
            return
        module = importlib.import_module(node.module)
        for alias in node.names:
            if hasattr(module, alias.name):
                self.bound[alias.asname or alias.name] = getattr(module, alias.name)
            else:
                try:
                    self.bound[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    self._say(node, f"cannot import {alias.name} from {node.module}")

    def resolve(self, node):
        """The jaxreg object an expression names (``jaxreg.io.load``), or None."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value)
            if owner is None:
                return None
            if not hasattr(owner, node.attr):
                self._say(node, f"{getattr(owner, '__name__', owner)!s} has no attribute {node.attr!r}")
                return None
            return getattr(owner, node.attr)
        return None

    def visit_Attribute(self, node):
        self.resolve(node)

    def visit_Call(self, node):
        function = self.resolve(node.func)
        if callable(function) and not isinstance(function, types.ModuleType):
            try:
                signature = inspect.signature(function)
            except (TypeError, ValueError):
                signature = None
            starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            if signature is not None and not starred:
                try:
                    signature.bind_partial(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
                except TypeError as err:
                    self._say(node, f"{ast.unparse(node.func)}(...): {err}")
        self.generic_visit(node)


def check_references(page: str):
    checker = _References(page)
    for line, code, _ in python_blocks(page):
        tree = ast.parse(code, filename=f"docs/{page}:{line}")
        checker.where = f"docs/{page}:{line}"
        checker.visit(tree)
    assert not checker.problems, "\n".join(checker.problems)


def check_command_lines(page: str):
    parser = cli._parser()
    for line, args in jaxreg_command_lines(page):
        try:
            parser.parse_args(args)
        except (cli.UsageError, SystemExit) as err:
            raise AssertionError(f"docs/{page}:{line}: jaxreg {' '.join(args)}: {err}") from None


# -- running -------------------------------------------------------------------------------


def run_page(page: str):
    namespace: dict = {"__name__": "docs_example"}
    skipped = []
    for line, code, skip in python_blocks(page):
        if skip:
            continue
        try:
            exec(compile(code, f"docs/{page}:{line}", "exec"), namespace)
        except ModuleNotFoundError as err:
            if err.name not in OPTIONAL_MODULES:
                raise
            skipped.append(f"line {line} ({err.name} is not installed)")
    if skipped:
        print(f"docs/{page}: skipped blocks at " + ", ".join(skipped))


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # tests.helpers, from the temporary folder too
    check_command_lines(page)
    blocks = python_blocks(page)
    if not blocks:
        return
    check_references(page)
    if page in EXPENSIVE and os.environ.get("JAXREG_DOCS_EXAMPLES") != "all":
        for line, code, _ in blocks:
            compile(code, f"docs/{page}:{line}", "exec")
        return
    if "demo/inputs/" in (DOCS / page).read_text(encoding="utf-8"):
        write_demo_inputs(tmp_path / "demo" / "inputs")
    monkeypatch.chdir(tmp_path)
    run_page(page)


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in PAGES:
        assert re.search(rf":\s*{re.escape(page)}\s*$", config, re.M), f"docs/{page} is not in mkdocs.yml's nav"
