"""Shared `python -m <package> <command> …` dispatch, and the `users` and `db` commands of `python -m store`.

    $ python -m store db upgrade [--url URL | --workspace DIR]      # migrate the annotation database to the newest
    $ python -m store db current [--url URL]                        # print its revision and schema version
    $ python -m store users add ana --role radiologist --password-stdin < pw.txt
    $ python -m store users list
    $ python -m store users demo [--file PATH]                      # what `make demo` runs

The database is `--url`, else the workspace's (`--workspace`, CONCEPTLENS_WORKSPACE, CONCEPTLENS_DATABASE_URL).
store/__main__.py lists the commands.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["dispatch", "users_main", "db_main"]

def dispatch(prog: str, commands: dict[str, tuple[str, str]], argv: list[str] | None = None) -> int:
    """Run `commands[argv[0]]`, a (module:function, help) pair; the module is imported only when used."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        width = max(map(len, commands))
        print(f"usage: python -m {prog} <command> [options]\n\ncommands:")
        for name, (_, text) in commands.items():
            print(f"  {name:<{width}}  {text}")
        return 0 if (not argv or argv[0] in ("-h", "--help")) else 2
    target, _ = commands[argv[0]]
    module, _, func = target.partition(":")
    return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="database URL (default: the workspace's annotation database)")
    p.add_argument("--workspace", help="workspace directory (default: CONCEPTLENS_WORKSPACE or ./workspace)")


def _settings(args):
    from .settings import load_settings

    return load_settings(args.workspace)


def _url(args) -> str:
    return args.url or _settings(args).database_url


def _open(args):
    from .annotations import open_database

    url = _url(args)
    if not args.url:
        _settings(args).ensure()
    return open_database(url)


def db_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m store db", description="the annotation database's schema")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("upgrade", "migrate to the newest revision (under a lock; idempotent)"),
                       ("current", "print the revision and schema version")):
        _where(sub.add_parser(name, help=text))
    args = p.parse_args(argv)
    from .annotations import (
        AnnotationDatabaseError,
        Database,
        current_revision,
        head_revision,
        open_database,
    )

    try:
        if args.cmd == "upgrade":
            db = _open(args)  # open_database upgrades
            print(f"{db!r}: at revision {current_revision(db)} (schema version {db.schema_version()})")
            db.dispose()
            return 0
        from pathlib import Path

        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        url = _url(args)
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
                and not Path(parsed.database).expanduser().is_file():
            raise AnnotationDatabaseError(f"{parsed.database}: no annotation database there (nothing was created)")
        try:
            db = open_database(url, create=False)
        except AnnotationDatabaseError as e:
            if "cannot open" in str(e):
                raise
            db = Database(create_engine(url), url)  # behind or ahead: report without changing it
        rev = current_revision(db)
        print(f"{db!r}: revision {rev or '(none)'}; this ConceptLens: {head_revision()}"
              + ("" if rev == head_revision() else " — run `python -m store db upgrade`"))
        db.dispose()
        return 0
    except AnnotationDatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def users_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m store users", description="user accounts of the review database")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add a user")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=("radiologist", "researcher", "admin"))
    add.add_argument("--display-name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input (else: no password, no login)")
    add.add_argument("--session", type=int, action="append", default=[],
                     help="also make the user a member of this session id (repeatable)")
    _where(add)
    _where(sub.add_parser("list", help="list the users"))
    demo = sub.add_parser("demo", help="demo users radiologist, researcher, admin with random passwords")
    demo.add_argument("--file", help="password file (default <workspace>/demo-accounts.txt)")
    _where(demo)
    args = p.parse_args(argv)
    from .accounts import add_member, create_demo_accounts, create_user, list_users
    from .errors import StoreError

    try:
        db = _open(args)
        if args.cmd == "add":
            password = None
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
            u = create_user(db, name=args.name, role=args.role, password=password, display_name=args.display_name,
                            actor="cli")
            for sid in args.session:
                add_member(db, sid, u.name, actor="cli")
            print(f"user {u.name} ({u.role}){'' if u.has_password else ' without password (cannot log in)'}")
        elif args.cmd == "list":
            for u in list_users(db):
                flags = ("" if u.active else " inactive") + ("" if u.has_password else " no-password")
                print(f"{u.name:<24} {u.role:<12} {u.display_name}{flags}")
        else:
            path = args.file or str(_settings(args).workspace / "demo-accounts.txt")
            passwords = create_demo_accounts(db, path)
            print(f"demo accounts (passwords in {path}, readable only by you):")
            for name, pw in passwords.items():
                print(f"  {name:<12} {pw}")
        db.dispose()
        return 0
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
