"""Alembic migrations for validator.store (run them with validator.store.upgrade)."""
