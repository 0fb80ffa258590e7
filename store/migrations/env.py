"""Alembic environment: runs on the connection store.annotations hands over (already locked and in a transaction).

    $ python -m store db upgrade [--url URL]     # the supported way (takes the migration lock)
    $ python -m store db current [--url URL]

Running the `alembic` command directly is not supported: it would skip the lock that lets two processes start
together, and SQLite's foreign-key handling around batch migrations.
"""

from alembic import context

from store.annotations import metadata

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run the annotation database migrations with `python -m store db upgrade` "
                       "(store.annotations.upgrade_database), not the alembic command")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
