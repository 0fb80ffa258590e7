"""Accounts, review sessions and rights: users with roles, session membership, the audit log.

    >>> from store.accounts import create_user, authenticate, create_session, require_member
    >>> ana = create_user(db, name="ana", role="radiologist", password="s3cret-enough", actor="admin")
    >>> authenticate(db, "ana", "s3cret-enough")                  # UserInfo, or None (same work either way)
    >>> s = create_session(db, name="March review", model_uri="models:/demo/3", store="demo",
    ...                    members=["ana", "rob"], actor="admin")
    >>> require_member(db, s.id, ana)                             # SessionInfo, or AccessDenied (→ 403)

Rules (docs/CONTRACTS.md, "Review database, schema v2"; where the contract is silent the choice is written here):
- Login names match `[a-z0-9][a-z0-9._-]{1,63}` and never change; roles are `ROLES` (radiologist, researcher,
  admin). Users created by the v1 → v2 migration, by an import or implicitly by a labeling script keep the author
  name they wrote (which may not fit the pattern) and have no password: they cannot log in until an admin sets one.
- Passwords: 8 to 1024 characters, hashed with argon2id (argon2-cffi's defaults); never logged, never exported.
- `UserInfo.stamp` is derived from the user's id, role, active flag and password hash: it changes when any of them
  changes, so a cookie holding the old stamp stops working.
- `require_member` re-reads the user from the database (a stale UserInfo with an old role or a deactivated
  account is refused); an unknown session and a session the user is not in give the same AccessDenied, so ids of
  other sessions cannot be probed. Admins pass everywhere.
- `can_remove(actor, author_role, author=...)`: own work always; otherwise the actor's role must rank at least the
  author's (researcher < radiologist < admin): a researcher never removes a radiologist's work, admins remove all.
- These functions record who did it (`actor`, a user name or UserInfo) but do not decide whether the actor may:
  callers check `require_admin` / `require_member` first (the CLI runs with the operator's rights).
- Every write appends to `AuditLog` in the same transaction: both are stored or neither.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from .annotations import (
    ROLES,
    WORKSPACE_SESSION,
    AuditLog,
    Database,
    ReviewSession,
    SessionMember,
    User,
    utcnow,
)
from .errors import AccessDenied, AccountError, ConflictError

__all__ = [
    "ROLES",
    "NAME_PATTERN",
    "UserInfo",
    "SessionInfo",
    "hash_password",
    "verify_password",
    "create_user",
    "set_password",
    "update_user",
    "get_user",
    "list_users",
    "authenticate",
    "create_session",
    "get_session",
    "add_member",
    "remove_member",
    "sessions_for",
    "require_member",
    "require_admin",
    "can_remove",
    "role_of",
    "ensure_author",
    "audit",
    "audit_entries",
    "create_demo_accounts",
    "DEMO_USERS",
]

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{1,63}")
MIN_PASSWORD, MAX_PASSWORD = 8, 1024
_RANK = {"researcher": 1, "radiologist": 2, "admin": 3}
DEMO_USERS = (("radiologist", "radiologist", "Demo radiologist"), ("researcher", "researcher", "Demo researcher"),
              ("admin", "admin", "Demo administrator"))


# -- passwords ---------------------------------------------------------------------------------------------------------
def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()  # argon2id with the library's current recommended parameters


def hash_password(password: str) -> str:
    """An argon2id hash (`$argon2id$…`) of a password of 8 to 1024 characters; AccountError otherwise."""
    _check_password(password)
    return _hasher().hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches the stored hash; False for a wrong password, a missing or malformed hash."""
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    if not password_hash or not isinstance(password, str):
        return False
    try:
        return bool(_hasher().verify(password_hash, password))
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


_DUMMY_HASH: list[str] = []


def _dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so a failed login costs the same either way."""
    if not _DUMMY_HASH:
        _DUMMY_HASH.append(_hasher().hash(secrets.token_urlsafe(16)))
    return _DUMMY_HASH[0]


def _check_password(password) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise AccountError(f"a password must be text of {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    return password


# -- users -------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserInfo:
    id: int
    name: str
    display_name: str
    role: str
    active: bool
    stamp: str
    version: int = 1
    has_password: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def _stamp(u: User) -> str:
    raw = f"{u.id}|{u.role}|{int(bool(u.active))}|{u.password_hash or ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _info(u: User) -> UserInfo:
    return UserInfo(id=u.id, name=u.name, display_name=u.display_name or u.name, role=u.role, active=bool(u.active),
                    stamp=_stamp(u), version=u.version, has_password=u.password_hash is not None)


def _actor_name(actor) -> str:
    name = actor.name if isinstance(actor, UserInfo) else actor
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise AccountError(f"actor must be a user name, got {actor!r}")
    return name


def _check_name(name) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AccountError(f"user name {name!r}: use 2 to 64 of a-z, 0-9, '.', '_', '-' (starting with a letter "
                           f"or digit)")
    return name


def _check_role(role) -> str:
    if role not in ROLES:
        raise AccountError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


def _check_display(display_name, name: str) -> str:
    if display_name is None:
        return name
    if not isinstance(display_name, str) or len(display_name) > 200 or not display_name.strip():
        raise AccountError(f"display name of {name!r} must be non-empty text of at most 200 characters")
    return display_name.strip()


def _user_row(s, name) -> User:
    u = s.scalar(select(User).where(User.name == name)) if isinstance(name, str) else None
    if u is None:
        raise AccountError(f"no user {name!r}")
    return u


def create_user(db: Database, *, name: str, role: str, password: str | None = None,
                display_name: str | None = None, actor) -> UserInfo:
    """A new user (AccountError when the name is taken or malformed, the role unknown, the password too short)."""
    name, role = _check_name(name), _check_role(role)
    display_name = _check_display(display_name, name)
    password_hash = hash_password(password) if password is not None else None
    actor = _actor_name(actor)
    with db.write() as s:
        if s.scalar(select(User.id).where(User.name == name)) is not None:
            raise AccountError(f"user {name!r} exists already")
        u = User(name=name, display_name=display_name, role=role, password_hash=password_hash, active=True,
                 version=1, created_at=utcnow())
        s.add(u)
        s.flush()
        audit(s, actor=actor, action="user.create", target=f"user:{name}",
              detail={"role": role, "password": password_hash is not None})
        return _info(u)


def set_password(db: Database, name: str, password: str | None, *, actor) -> UserInfo:
    """Set (or with None remove) a user's password; the stamp changes, so their open sessions end."""
    password_hash = hash_password(password) if password is not None else None
    actor = _actor_name(actor)
    with db.write() as s:
        u = _user_row(s, name)
        u.password_hash = password_hash
        u.version += 1
        s.flush()
        audit(s, actor=actor, action="user.password", target=f"user:{u.name}",
              detail={"password": password_hash is not None})
        return _info(u)


def update_user(db: Database, name: str, *, expected_version: int, role: str | None = None,
                active: bool | None = None, display_name: str | None = None, actor) -> UserInfo:
    """Change a user's role, active flag or display name; ConflictError when `expected_version` is stale."""
    if role is not None:
        _check_role(role)
    if active is not None and not isinstance(active, bool):
        raise AccountError(f"active must be True or False, got {active!r}")
    actor = _actor_name(actor)
    with db.write() as s:
        u = _user_row(s, name)
        if display_name is not None:
            display_name = _check_display(display_name, u.name)
        _check_version(s, u.version, expected_version, what=f"user {u.name!r}", target=f"user:{u.name}")
        changes = {}
        for field, value in (("role", role), ("active", active), ("display_name", display_name)):
            if value is not None and getattr(u, field) != value:
                changes[field] = [getattr(u, field), value]
                setattr(u, field, value)
        if changes:
            u.version += 1
            s.flush()
            audit(s, actor=actor, action="user.update", target=f"user:{u.name}", detail=changes)
        return _info(u)


def _check_version(s, current: int, expected, *, what: str, target: str) -> None:
    """ConflictError naming the last writer (from the audit log) when `expected` is not the row's version."""
    if isinstance(expected, bool) or not isinstance(expected, int):
        raise AccountError(f"expected_version of {what} must be an integer, got {expected!r}")
    if expected != current:
        last = s.scalar(select(AuditLog).where(AuditLog.target == target).order_by(AuditLog.id.desc()).limit(1))
        raise ConflictError(what, who=last.actor if last else None, when=last.at if last else None,
                            current_version=current)


def get_user(db: Database, name: str) -> UserInfo | None:
    if not isinstance(name, str):
        return None
    with db.read() as s:
        u = s.scalar(select(User).where(User.name == name))
        return _info(u) if u is not None else None


def list_users(db: Database) -> list[UserInfo]:
    with db.read() as s:
        return [_info(u) for u in s.scalars(select(User).order_by(User.name))]


def authenticate(db: Database, name: str, password: str) -> UserInfo | None:
    """The user when `name` is an active user whose password matches; None otherwise, after the same argon2 work
    (an unknown name, a user without password and a wrong password cannot be told apart by time)."""
    info, stored = None, None
    if isinstance(name, str) and len(name) <= 200:
        with db.read() as s:
            u = s.scalar(select(User).where(User.name == name))
            if u is not None and u.password_hash is not None and u.active:
                info, stored = _info(u), u.password_hash
    if not isinstance(password, str) or len(password) > MAX_PASSWORD:
        password = ""
    matched = verify_password(stored if stored is not None else _dummy_hash(), password)
    return info if stored is not None and matched else None


def role_of(s, name: str) -> str | None:
    """The role of the user `name` inside an open SQLAlchemy session (None: no such user)."""
    return s.scalar(select(User.role).where(User.name == name))


def ensure_author(s, name: str, *, actor: str | None = None) -> User:
    """The user row of an author inside an open write session; a name never seen before becomes a user without
    password (role radiologist, the most protected: a researcher cannot remove its work) — as the migration does
    for every v1 author. Used by explain.labels so that every author is a user."""
    u = s.scalar(select(User).where(User.name == name))
    if u is None:
        u = User(name=name, display_name=name, role="radiologist", password_hash=None, active=True, version=1,
                 created_at=utcnow())
        s.add(u)
        s.flush()
        audit(s, actor=actor or name, action="user.create", target=f"user:{name}",
              detail={"role": "radiologist", "password": False, "implicit": True})
    return u


# -- sessions ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionInfo:
    id: int
    name: str
    model_uri: str | None
    store: str | None
    members: tuple[str, ...]
    version: int
    created_by: str | None = None
    created_at: object = None
    archived_at: object = None


def _session_info(s, rs: ReviewSession) -> SessionInfo:
    members = s.scalars(select(User.name).join(SessionMember, SessionMember.user_id == User.id)
                        .where(SessionMember.session_id == rs.id).order_by(User.name)).all()
    return SessionInfo(id=rs.id, name=rs.name, model_uri=rs.model_uri, store=rs.store, members=tuple(members),
                       version=rs.version, created_by=rs.created_by, created_at=rs.created_at,
                       archived_at=rs.archived_at)


def _check_session_name(name) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise AccountError(f"session name must be non-empty text of at most 200 characters, got {name!r}")
    return name.strip()


def create_session(db: Database, *, name: str, model_uri: str | None = None, store: str | None = None,
                   members=(), actor) -> SessionInfo:
    """A new review session with `members` (user names; unknown ones → AccountError). The actor, when a user,
    becomes a member too."""
    name = _check_session_name(name)
    for value, what in ((model_uri, "model_uri"), (store, "store")):
        if value is not None and (not isinstance(value, str) or len(value) > 1000):
            raise AccountError(f"{what} must be text of at most 1000 characters, got {value!r}")
    actor = _actor_name(actor)
    members = list(members)
    with db.write() as s:
        if s.scalar(select(ReviewSession.id).where(ReviewSession.name == name)) is not None:
            raise AccountError(f"a session named {name!r} exists already")
        users = [_user_row(s, m) for m in members]
        me = s.scalar(select(User).where(User.name == actor))
        if me is not None and me not in users:
            users.append(me)
        rs = ReviewSession(name=name, model_uri=model_uri, store=store, created_by=actor, created_at=utcnow(),
                           version=1)
        s.add(rs)
        s.flush()
        for u in users:
            s.add(SessionMember(session_id=rs.id, user_id=u.id, added_at=utcnow()))
        s.flush()
        audit(s, actor=actor, action="session.create", session_id=rs.id, target=f"session:{rs.id}",
              detail={"name": name, "model_uri": model_uri, "store": store,
                      "members": sorted(u.name for u in users)})
        return _session_info(s, rs)


def _session_row(s, session_id) -> ReviewSession:
    rs = s.get(ReviewSession, session_id) if _is_id(session_id) else None
    if rs is None:
        raise AccountError(f"no review session {session_id!r}")
    return rs


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**62


def get_session(db: Database, session_id: int) -> SessionInfo:
    with db.read() as s:
        return _session_info(s, _session_row(s, session_id))


def add_member(db: Database, session_id: int, name: str, *, actor) -> SessionInfo:
    """Add a user to a session (already a member: nothing changes)."""
    actor = _actor_name(actor)
    with db.write() as s:
        rs = _session_row(s, session_id)
        u = _user_row(s, name)
        if s.get(SessionMember, (rs.id, u.id)) is None:
            s.add(SessionMember(session_id=rs.id, user_id=u.id, added_at=utcnow()))
            rs.version += 1
            s.flush()
            audit(s, actor=actor, action="session.add_member", session_id=rs.id, target=f"session:{rs.id}",
                  detail={"user": u.name})
        return _session_info(s, rs)


def remove_member(db: Database, session_id: int, name: str, *, actor) -> SessionInfo:
    """Remove a user from a session (their annotations stay, attributed to them)."""
    actor = _actor_name(actor)
    with db.write() as s:
        rs = _session_row(s, session_id)
        u = _user_row(s, name)
        m = s.get(SessionMember, (rs.id, u.id))
        if m is not None:
            s.delete(m)
            rs.version += 1
            s.flush()
            audit(s, actor=actor, action="session.remove_member", session_id=rs.id, target=f"session:{rs.id}",
                  detail={"user": u.name})
        return _session_info(s, rs)


def sessions_for(db: Database, user: UserInfo, *, include_archived: bool = False) -> list[SessionInfo]:
    """The sessions `user` may open, by id (admins: all; an inactive or unknown user: none)."""
    with db.read() as s:
        u = s.scalar(select(User).where(User.name == user.name)) if isinstance(user, UserInfo) else None
        if u is None or not u.active:
            return []
        q = select(ReviewSession).order_by(ReviewSession.id)
        if u.role != "admin":
            q = q.join(SessionMember, SessionMember.session_id == ReviewSession.id).where(SessionMember.user_id == u.id)
        if not include_archived:
            q = q.where(ReviewSession.archived_at.is_(None))
        return [_session_info(s, rs) for rs in s.scalars(q)]


def require_member(db: Database, session_id, user: UserInfo) -> SessionInfo:
    """The session when `user` (as the database knows them now) is a member, or an admin; AccessDenied otherwise
    — also for a malformed or unknown session id, with the same message, so ids cannot be probed."""
    who = user.name if isinstance(user, UserInfo) else repr(user)
    denied = AccessDenied(f"user {who} may not open review session {session_id!r}")
    if not isinstance(user, UserInfo) or not _is_id(session_id):
        raise denied
    with db.read() as s:
        u = s.scalar(select(User).where(User.name == user.name))
        if u is None or not u.active or _stamp(u) != user.stamp:
            raise AccessDenied(f"user {who} must sign in again (account changed or disabled)")
        rs = s.get(ReviewSession, session_id)
        if rs is None:
            raise denied
        if u.role != "admin" and s.get(SessionMember, (rs.id, u.id)) is None:
            raise denied
        return _session_info(s, rs)


def require_admin(user: UserInfo) -> UserInfo:
    """`user` when an active admin; AccessDenied otherwise."""
    if not isinstance(user, UserInfo) or user.role != "admin" or not user.active:
        raise AccessDenied(f"user {getattr(user, 'name', user)!r} is not an administrator")
    return user


def can_remove(actor: UserInfo, author_role: str | None, *, author: str | None = None) -> bool:
    """May `actor` remove (undo, delete) work of an author with `author_role`? Own work (author == actor.name)
    always; otherwise the actor's role must rank at least the author's (researcher < radiologist < admin). An
    unknown author role counts as radiologist."""
    if author is not None and author == actor.name:
        return True
    if not actor.active:
        return False
    return _RANK.get(actor.role, 0) >= _RANK.get(author_role or "radiologist", _RANK["radiologist"])


# -- audit -------------------------------------------------------------------------------------------------------------
def audit(session, *, actor, action: str, session_id: int | None = None, target: str = "",
          detail: dict | None = None) -> AuditLog:
    """Append one entry to the audit log inside the caller's open write session (same transaction)."""
    row = AuditLog(at=utcnow(), actor=_actor_name(actor), action=action, session_id=session_id,
                   target=str(target)[:500], detail=detail)
    session.add(row)
    return row


def audit_entries(db: Database, *, session_id: int | None = None, limit: int = 1000) -> list[dict]:
    """The newest audit entries (of one session), newest first, as plain dicts."""
    q = select(AuditLog).order_by(AuditLog.id.desc()).limit(int(limit))
    if session_id is not None:
        q = q.where(AuditLog.session_id == session_id)
    with db.read() as s:
        return [{"id": a.id, "at": a.at, "actor": a.actor, "action": a.action, "session_id": a.session_id,
                 "target": a.target, "detail": a.detail} for a in s.scalars(q)]


# -- demo accounts -----------------------------------------------------------------------------------------------------
def create_demo_accounts(db: Database, path) -> dict[str, str]:
    """Users `radiologist`, `researcher` and `admin` with random passwords, members of session 1; the passwords are
    written to `path` (text, one `name: password` line each, mode 0600). Idempotent: an existing file is reused
    (its passwords are (re)applied when a user lacks them), so running it twice prints the same passwords."""
    path = Path(path)
    passwords: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, pw = line.partition(":")
            if not sep or not pw.strip():
                raise AccountError(f"{path}: not a demo password file (lines `name: password`); remove it to make "
                                   f"new passwords")
            passwords[name.strip()] = pw.strip()
    changed = False
    for name, _, _ in DEMO_USERS:
        if len(passwords.get(name, "")) < MIN_PASSWORD:
            passwords[name] = secrets.token_urlsafe(12)
            changed = True
    for name, role, display in DEMO_USERS:
        u = get_user(db, name)
        if u is None:
            create_user(db, name=name, role=role, password=passwords[name], display_name=display, actor="demo")
        else:
            with db.read() as s:
                h = s.scalar(select(User.password_hash).where(User.name == name))
            if not verify_password(h, passwords[name]):
                set_password(db, name, passwords[name], actor="demo")
        add_member(db, WORKSPACE_SESSION, name, actor="demo")
    if changed or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# ConceptLens demo accounts (python -m store users demo): name: password\n")
            f.writelines(f"{n}: {passwords[n]}\n" for n, _, _ in DEMO_USERS)
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    return {n: passwords[n] for n, _, _ in DEMO_USERS}


