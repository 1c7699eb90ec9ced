"""One owner per kind of Redis key: ``queue.keys`` builds every ``dispatch:`` key, and only the send store
(``queue.store``) uses the store's keys — every other module asks the store (issue 12, "one owner").

Walks the source with ``ast``; a test that fails names the module and the line.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import dispatcher
from dispatcher.queue import keys

PACKAGE = Path(dispatcher.__file__).parent
KEYS_MODULE = PACKAGE / "queue" / "keys.py"
STORE_MODULE = PACKAGE / "queue" / "store.py"
# The other owners of a kind of key, and the one name of queue.keys each builds theirs from.
OTHER_OWNERS = {
    PACKAGE / "routes" / "config.py": {"PREFIX"},  # routes.config.route_key: limits, slots, breaker
    PACKAGE / "dashboard" / "auth.py": {"login_failures_key"},
    PACKAGE / "dashboard" / "sessions.py": {"SESSION_PREFIX", "session_key"},
    PACKAGE / "queue" / "presence.py": {"RECONCILER_LOCK", "ROUTES", "worker_key"},
}
KEY_NAMES = {n for n in vars(keys) if not n.startswith("_")} - {"annotations", "hashlib"}
KEY_HOLDERS = ("dispatcher.queue.keys", "dispatcher.queue.store")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != KEYS_MODULE)


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    for node in ast.walk(tree):  # attribute docstrings: a bare string right after an assignment
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, [])
            if not isinstance(statements, list):
                continue
            for before, after in itertools.pairwise(statements):
                assignment = isinstance(before, ast.Assign | ast.AnnAssign)
                if assignment and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    found.add(id(after.value))
    return found


def test_no_module_but_queue_keys_spells_a_dispatch_key() -> None:
    offenders = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            literal = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else node
            if (
                isinstance(literal, ast.Constant)
                and id(literal) not in skip
                and isinstance(literal.value, str)
                and literal.value.startswith("dispatch:")
            ):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_only_the_store_uses_the_store_keys() -> None:
    offenders = []
    for path in _modules():
        if path == STORE_MODULE:
            continue
        allowed = OTHER_OWNERS.get(path, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in KEY_HOLDERS:
                names = {alias.name for alias in node.names} & KEY_NAMES - allowed
                if names:
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {sorted(names)}")
            if isinstance(node, ast.Import) and any(a.name == "dispatcher.queue.keys" for a in node.names):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports the module")
    assert offenders == []


def test_the_checks_see_an_offender() -> None:
    """The walk above would catch a module that builds a key or imports one (it can fail)."""
    tree = ast.parse('from dispatcher.queue.keys import send_key\nKEY = f"dispatch:send:{1}"\n')
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    strings = [n.values[0] for n in ast.walk(tree) if isinstance(n, ast.JoinedStr)]
    assert imports[0].module == "dispatcher.queue.keys"
    assert isinstance(strings[0], ast.Constant) and strings[0].value.startswith("dispatch:")
