"""One file per migration, named after its revision id (Alembic skips this file)."""
