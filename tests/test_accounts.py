"""Accounts and rights: argon2 hashes, authentication, stamps, users and sessions with their audit entries, forged
session ids, undo rights, demo accounts — on SQLite (PostgreSQL for the conflict and membership checks)."""

from __future__ import annotations

import os
import stat

import pytest
from helpers_dissection import fresh_postgres_database

from store.accounts import (
    UserInfo,
    add_member,
    audit_entries,
    authenticate,
    can_remove,
    create_demo_accounts,
    create_session,
    create_user,
    get_user,
    hash_password,
    list_users,
    remove_member,
    require_admin,
    require_member,
    sessions_for,
    set_password,
    update_user,
    verify_password,
)
from store.annotations import dump, open_database
from store.errors import AccessDenied, AccountError, ConflictError, StoreError


@pytest.fixture
def db(tmp_path):
    return open_database(f"sqlite:///{tmp_path / 'a.db'}")


def test_passwords_are_argon2id_and_verify_only_the_right_password():
    h = hash_password("correct horse")
    assert h.startswith("$argon2id$") and "correct horse" not in h
    assert verify_password(h, "correct horse")
    assert not verify_password(h, "correct hors")
    assert not verify_password(None, "correct horse") and not verify_password("not a hash", "correct horse")
    for bad in ("short", "x" * 1025, None, 12345678):
        with pytest.raises(AccountError, match="8 to 1024"):
            hash_password(bad)


def test_users_authentication_and_the_stamp(db):
    ana = create_user(db, name="ana", role="radiologist", password="ana-password", display_name="Ana R.",
                      actor="admin")
    assert (ana.name, ana.role, ana.display_name, ana.active, ana.has_password) == \
        ("ana", "radiologist", "Ana R.", True, True)
    assert authenticate(db, "ana", "ana-password") == ana
    assert authenticate(db, "ana", "wrong-password") is None
    assert authenticate(db, "nobody", "ana-password") is None
    assert authenticate(db, "ana", None) is None
    rob = create_user(db, name="rob", role="researcher", actor="admin")  # no password: cannot log in
    assert authenticate(db, "rob", "") is None and not rob.has_password
    # the stamp changes with the password and the role, so old cookies stop working
    s1 = get_user(db, "ana").stamp
    set_password(db, "ana", "new-password!", actor="admin")
    s2 = get_user(db, "ana").stamp
    assert s2 != s1 and authenticate(db, "ana", "ana-password") is None
    update_user(db, "ana", expected_version=get_user(db, "ana").version, role="admin", actor="admin")
    assert get_user(db, "ana").stamp not in (s1, s2)
    assert [u.name for u in list_users(db)] == ["ana", "rob"]
    actions = [e["action"] for e in audit_entries(db)]
    assert actions == ["user.update", "user.password", "user.create", "user.create", "schema.upgrade"]
    assert "$argon2" not in str(audit_entries(db)) and "new-password!" not in str(audit_entries(db))


def test_bad_accounts_are_refused_and_nothing_is_stored(db):
    create_user(db, name="ana", role="radiologist", actor="admin")
    before = dump(db)
    for kwargs, match in [(dict(name="Ana Smith", role="radiologist"), "user name 'Ana Smith'"),
                          (dict(name="a", role="radiologist"), "user name 'a'"),
                          (dict(name="bob", role="surgeon"), "role 'surgeon'"),
                          (dict(name="bob", role="researcher", password="short"), "8 to 1024"),
                          (dict(name="ana", role="researcher"), "exists already")]:
        with pytest.raises(AccountError, match=match):
            create_user(db, actor="admin", **kwargs)
    with pytest.raises(AccountError, match="no user 'zed'"):
        set_password(db, "zed", "long-enough", actor="admin")
    assert dump(db) == before
    assert isinstance(AccountError("x"), ValueError) and isinstance(AccessDenied("x"), PermissionError)


def test_a_stale_version_is_a_conflict_naming_who_changed_it_and_nothing_is_overwritten(db):
    create_user(db, name="ana", role="radiologist", actor="admin")
    seen = get_user(db, "ana").version
    update_user(db, "ana", expected_version=seen, display_name="Ana (first editor)", actor="boss")
    before = dump(db)
    with pytest.raises(ConflictError, match=r"user 'ana' was changed by boss at \d{4}-.*; reload and try again"):
        update_user(db, "ana", expected_version=seen, role="admin", actor="other-admin")
    assert dump(db) == before and get_user(db, "ana").role == "radiologist"


def test_sessions_members_and_forged_session_ids(db):
    ana = create_user(db, name="ana", role="radiologist", password="ana-password", actor="admin")
    rob = create_user(db, name="rob", role="researcher", password="rob-password", actor="admin")
    boss = create_user(db, name="boss", role="admin", password="boss-password", actor="admin")
    s = create_session(db, name="March", model_uri="models:/demo/3", store="demo", members=["ana"], actor="ana")
    assert s.members == ("ana",) and s.id == 2
    assert require_member(db, s.id, ana).name == "March"
    assert require_member(db, s.id, boss).id == s.id  # admins pass
    before = dump(db)
    # another session, an unknown id, a malformed id, a forged user: the same refusal
    for sid in (1, 999, "2", True, -1, None, 2.0, 2**70):
        with pytest.raises(AccessDenied):
            require_member(db, sid, ana if sid != 2.0 else rob)
    with pytest.raises(AccessDenied, match="may not open review session 2"):
        require_member(db, s.id, rob)
    forged = UserInfo(id=ana.id, name="ana", display_name="ana", role="admin", active=True, stamp="forged")
    with pytest.raises(AccessDenied, match="sign in again"):
        require_member(db, s.id, forged)
    assert dump(db) == before
    add_member(db, s.id, "rob", actor="ana")
    rob = get_user(db, "rob")
    assert require_member(db, s.id, rob).members == ("ana", "rob")
    assert [x.id for x in sessions_for(db, rob)] == [s.id]
    assert [x.id for x in sessions_for(db, boss)] == [1, s.id]
    remove_member(db, s.id, "rob", actor="ana")
    with pytest.raises(AccessDenied):
        require_member(db, s.id, rob)
    # a deactivated account is refused everywhere at once
    update_user(db, "ana", expected_version=get_user(db, "ana").version, active=False, actor="boss")
    with pytest.raises(AccessDenied):
        require_member(db, s.id, get_user(db, "ana"))
    assert sessions_for(db, get_user(db, "ana")) == []
    with pytest.raises(AccountError, match="exists already"):
        create_session(db, name="March", actor="boss")
    assert require_admin(boss) is boss
    with pytest.raises(AccessDenied, match="not an administrator"):
        require_admin(rob)
    kinds = [e["action"] for e in audit_entries(db, session_id=s.id)]
    assert kinds == ["session.remove_member", "session.add_member", "session.create"]


def test_who_may_remove_whose_work():
    def u(name, role):
        return UserInfo(id=1, name=name, display_name=name, role=role, active=True, stamp="s")

    rad, res, adm = u("ana", "radiologist"), u("rob", "researcher"), u("boss", "admin")
    assert can_remove(res, "researcher", author="rob")  # own work always
    assert can_remove(res, "radiologist", author="rob")  # own work, whatever role is passed
    assert not can_remove(res, "radiologist", author="ana")  # a researcher never removes a radiologist's
    assert not can_remove(res, None, author="someone")  # an unknown author counts as a radiologist
    assert can_remove(res, "researcher", author="rita")
    assert can_remove(rad, "researcher", author="rob") and can_remove(rad, "radiologist", author="carl")
    assert not can_remove(rad, "admin", author="boss")
    assert all(can_remove(adm, r, author="x") for r in ("radiologist", "researcher", "admin"))


def test_audit_entries_are_written_with_their_change_or_not_at_all(db):
    create_user(db, name="ana", role="radiologist", actor="admin")
    n = len(audit_entries(db))
    with pytest.raises(AccountError):
        create_session(db, name="S", members=["ana", "ghost"], actor="admin")  # fails after the checks began
    assert len(audit_entries(db)) == n and dump(db)["review_session"][0]["name"] == "Workspace"


def test_demo_accounts_are_created_once_with_a_private_password_file(db, tmp_path):
    path = tmp_path / "ws" / "demo-accounts.txt"
    pw = create_demo_accounts(db, path)
    assert set(pw) == {"radiologist", "researcher", "admin"} and all(len(p) >= 12 for p in pw.values())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert all(f"{n}: {p}" in path.read_text() for n, p in pw.items())
    for name, p in pw.items():
        user = authenticate(db, name, p)
        assert user is not None and user.role == name
        assert require_member(db, 1, user).id == 1
    before = dump(db)
    assert create_demo_accounts(db, path) == pw  # idempotent: the file is reused, nothing changes
    assert dump(db) == before
    fresh = open_database(f"sqlite:///{tmp_path / 'b.db'}")  # the same file applied to a new database
    assert create_demo_accounts(fresh, path) == pw and authenticate(fresh, "admin", pw["admin"]) is not None
    path.write_text("garbage without a colon\n")
    with pytest.raises(AccountError, match="not a demo password file"):
        create_demo_accounts(db, path)


@pytest.mark.services
def test_accounts_and_membership_on_postgresql(postgres_url):
    with fresh_postgres_database(postgres_url) as url:
        db = open_database(url)
        ana = create_user(db, name="ana", role="radiologist", password="ana-password", actor="admin")
        rob = create_user(db, name="rob", role="researcher", actor="admin")
        s = create_session(db, name="March", members=["ana"], actor="admin")
        assert require_member(db, s.id, ana).members == ("ana",)
        with pytest.raises(AccessDenied):
            require_member(db, s.id, rob)
        assert authenticate(db, "ana", "ana-password") == ana
        v = get_user(db, "ana").version
        update_user(db, "ana", expected_version=v, display_name="Ana", actor="boss")
        with pytest.raises(ConflictError, match="changed by boss"):
            update_user(db, "ana", expected_version=v, display_name="Anna", actor="other")
        assert isinstance(ConflictError("x"), StoreError)
        db.dispose()
