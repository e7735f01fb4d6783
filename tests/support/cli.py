"""``cityedge ARGS`` run in the test's own process, through the same entry point as the
installed command (``cityedge.cli.main``, as ``python -m cityedge.cli`` runs it), for tests
that are about what a command does and says, not about the process boundary.

A subprocess costs a Python start-up plus the fleet's imports (SQLAlchemy, SQLModel, the
crypto libraries), about 0.9 s each; in process the imports are paid once per worker.
``run`` gives the command what a subprocess would have: exactly the environment given
(``os.environ`` is replaced, then restored), the working directory, ``sys.argv``, an
empty stdin that is not a terminal (as ``stdin=subprocess.DEVNULL``), its own stdout and
stderr (captured as text), and an exit code: the ``SystemExit`` the command
ends with (0 when it returns), or 1 with the traceback on stderr for an exception that
escapes it, as the interpreter would print and exit. Every database engine the command
opened (``cityedge_fleet.db.make_engine``) is disposed afterwards, as the process's exit
would close its connections, and the command starts with no loaded CA
(``cityedge_fleet.ca.load_current``'s cache is emptied for it and put back after), as a
new process would: it reads the CA directory itself rather than see the test's in-process
service's copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def _replaced(store: MutableMapping[str, Any], contents: Mapping[str, Any]) -> Iterator[None]:
    """``store`` holds exactly ``contents`` while inside, what it held before after."""
    saved = dict(store)
    store.clear()
    store.update(contents)
    try:
        yield
    finally:
        store.clear()
        store.update(saved)


@contextlib.contextmanager
def _fresh_ca_cache() -> Iterator[None]:
    try:
        from cityedge_fleet import ca
    except ModuleNotFoundError:  # a part without the fleet's stack
        yield
        return
    with _replaced(ca._cache, {}):
        yield


@contextlib.contextmanager
def _engines_disposed() -> Iterator[None]:
    """Dispose of every engine ``make_engine`` makes while inside (the fleet's modules
    look it up on ``cityedge_fleet.db`` when called)."""
    try:
        from cityedge_fleet import db
    except ModuleNotFoundError:  # a part without the fleet's stack
        yield
        return
    made: list[Any] = []
    original = db.make_engine

    def recording(*args: Any, **kwargs: Any) -> Any:
        engine = original(*args, **kwargs)
        made.append(engine)
        return engine

    db.make_engine = recording
    try:
        yield
    finally:
        db.make_engine = original
        for engine in made:
            engine.dispose()


def run(args: list[str] | tuple[str, ...], env: Mapping[str, str],
        cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    """``cityedge *args`` with environment ``env`` (the whole environment, as
    ``subprocess.run(env=...)``) in ``cwd``: its exit code, stdout and stderr."""
    from cityedge import cli

    out, err = io.StringIO(), io.StringIO()
    argv = ["cityedge", *args]
    code: int = 0
    saved_argv, saved_stdin, saved_cwd = sys.argv, sys.stdin, os.getcwd()
    try:
        with _replaced(os.environ, env), _engines_disposed(), _fresh_ca_cache(), \
                contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            sys.argv, sys.stdin = argv, io.StringIO("")
            if cwd is not None:
                os.chdir(cwd)
            try:
                cli.main()
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:  # sys.exit("message"): printed on stderr, exit 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:  # escaped the command: what the interpreter would print
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())
