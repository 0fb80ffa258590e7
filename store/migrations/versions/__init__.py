"""Alembic revision scripts (one module per revision; frozen once released: never edit a released revision)."""
