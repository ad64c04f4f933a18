"""Alembic environment. `validator.store.upgrade(url)` passes its own connection (inside
one transaction) in config.attributes["connection"]; otherwise the engine comes from the
config's sqlalchemy.url, so `alembic revision --autogenerate` works with a Config from
`validator.store.alembic_config()` plus that option."""

from alembic import context

from validator.store import Base, engine_for

config = context.config


def _migrate(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"),
                      target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif "connection" in config.attributes:
    _migrate(config.attributes["connection"])
else:
    engine = engine_for(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as connection:
            _migrate(connection)
    finally:
        engine.dispose()
