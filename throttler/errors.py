"""One classification of the errors every loop meets: Redis away, database away, bad statement.

Every loop that talks to Redis or the database (relay steps, reconciler and retention
passes, pub/sub listeners, the worker's supervisor and status writes, the API's 503/500
split) decides with these and nothing else, so "is it worth trying again?" has one answer.
"""

from __future__ import annotations

from redis.exceptions import RedisError
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

# Redis is away, restarting, failing over or too slow: try again later. Every redis-py
# error is a RedisError (a connection lost between WATCH and EXEC is a WatchError, a
# replica during a failover answers ReadOnlyError, a restarting server BusyLoadingError);
# a refused or timed-out connect can also surface as a plain OSError or TimeoutError.
REDIS_ERRORS: tuple[type[Exception], ...] = (RedisError, OSError, TimeoutError)

# Connection loss, lock timeouts, a full pool, a refused or timed-out connect (a driver
# may raise those as OSError, outside SQLAlchemy's wrapping): the database is away for now.
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (DBAPIError, PoolTimeoutError, OSError)
# DBAPIError subclasses that say the statement or its data is wrong, not that the database
# is away: another try cannot help (a 500 in the API, not a 503).
STATEMENT_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
)

# A background pass (relay step, reconciler, pruner) that fails for one of these is
# logged and tried again after a pause; anything else is a bug and ends the loop.
RECOVERABLE_ERRORS: tuple[type[Exception], ...] = (SQLAlchemyError, *REDIS_ERRORS)


def is_transient_db_error(error: BaseException) -> bool:
    """Whether another try of the same database write may succeed (the database was away)."""
    return isinstance(error, TRANSIENT_DB_ERRORS) and not isinstance(error, STATEMENT_ERRORS)
