"""Who the caller is (an account, an admin or not), and which account a read is about.

``API_ADMIN_KEYS`` names keys of ``API_KEYS`` that may read every account: on the task
reads they may pass ``?account=`` (without it they read their own account, like any key).
A caller without an admin key who passes ``account=`` gets 403, not a silent answer about
its own account: the request asked for something it may not have. With ``API_KEYS`` unset
everything is open, as in development, so every caller may pass ``account=``.

``AdminDep`` is the guard for admin-only calls (403 otherwise); ``ReadAccountDep`` is the
account a task read is about; ``CountedAccountDep`` whose tasks the relay status counts
(an admin: every account's unless it names one).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials

from api.deps import SettingsDep, account_of_key, bearer_scheme, unauthorized
from api.schemas import ErrorMessage
from api.strict_query import query_error
from throttler.constants import DEFAULT_ACCOUNT
from throttler.models import ACCOUNT_LENGTH

ACCOUNT_PARAMETER = "account"


@dataclass(frozen=True, kw_only=True, slots=True)
class Caller:
    """The caller: its own account, and whether its key may read every account."""

    account: str
    admin: bool


def is_admin_key(admin_keys: Sequence[str], presented: str) -> bool:
    """Whether ``presented`` is one of ``admin_keys``, in time independent of which."""
    presented_bytes = presented.encode()
    found = False
    # Compare with every key, without stopping early, as api.deps.account_of_key does.
    for key in admin_keys:
        found |= hmac.compare_digest(key.encode(), presented_bytes)
    return found


async def get_caller(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Caller:
    """The caller's account and rights: 401 without a valid key when API_KEYS is set."""
    accounts = settings.accounts_by_key
    if not accounts:
        # No keys: everything is open, as in development.
        return Caller(account=DEFAULT_ACCOUNT, admin=True)
    if credentials is None:
        raise unauthorized()
    account = account_of_key(accounts, credentials.credentials)
    if account is None:
        raise unauthorized()
    return Caller(account=account, admin=is_admin_key(settings.admin_keys, credentials.credentials))


CallerDep = Annotated[Caller, Depends(get_caller)]


def forbidden(detail: str = "this call needs an admin key (API_ADMIN_KEYS)") -> HTTPException:
    return HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=detail)


async def get_admin(caller: CallerDep) -> Caller:
    """The caller, if its key is an admin key (or keys are off); 403 otherwise."""
    if not caller.admin:
        raise forbidden()
    return caller


# For admin-only calls (limit changes, pauses): 401 without a valid key, 403 without an
# admin key.
AdminDep = Annotated[Caller, Depends(get_admin)]


def _checked_account(request: Request, account: str) -> str:
    """``account`` as given once, 1-ACCOUNT_LENGTH printable characters; else a 422."""
    if len(request.query_params.getlist(ACCOUNT_PARAMETER)) > 1:
        raise query_error(
            ACCOUNT_PARAMETER, "value_error", "account is given more than once; give it once", None
        )
    if not account or len(account) > ACCOUNT_LENGTH:
        raise query_error(
            ACCOUNT_PARAMETER,
            "string_length",
            f"account must be 1-{ACCOUNT_LENGTH} characters",
            account[:ACCOUNT_LENGTH],
        )
    # A NUL or control character names no account, and PostgreSQL refuses NUL outright.
    if not account.isprintable():
        raise query_error(
            ACCOUNT_PARAMETER, "value_error", "account must be printable characters", None
        )
    return account


async def get_read_account(
    request: Request,
    caller: CallerDep,
    account: Annotated[
        str | None,
        Query(
            description="Admin keys only (API_ADMIN_KEYS): read this account's tasks instead "
            "of the caller's. Another key passing it gets 403.",
        ),
    ] = None,
) -> str:
    """The account a read is about: ``?account=`` for an admin, else the caller's own."""
    if account is None:
        return caller.account
    if not caller.admin:
        # Refused before the value is looked at: a non-admin learns nothing from it.
        raise forbidden("account= needs an admin key (API_ADMIN_KEYS)")
    return _checked_account(request, account)


ReadAccountDep = Annotated[str, Depends(get_read_account)]


async def get_counted_account(
    request: Request,
    caller: CallerDep,
    account: Annotated[
        str | None,
        Query(
            description="Admin keys only (API_ADMIN_KEYS): count only this account's tasks "
            "(an admin key counts every account's without it). Another key passing it gets "
            "403.",
        ),
    ] = None,
) -> str | None:
    """Whose tasks an operational view counts: None for every account's.

    An admin (or anyone, without API_KEYS) sees the whole cluster unless it names an
    account; any other key sees only its own account's tasks, as before admin keys.
    """
    if account is not None:
        if not caller.admin:
            raise forbidden("account= needs an admin key (API_ADMIN_KEYS)")
        return _checked_account(request, account)
    return None if caller.admin else caller.account


CountedAccountDep = Annotated[str | None, Depends(get_counted_account)]

# The answers these add to an operation's OpenAPI description.
FORBIDDEN_RESPONSE: dict[int | str, dict[str, Any]] = {
    403: {
        "model": ErrorMessage,
        "description": "account= given without an admin key (API_ADMIN_KEYS).",
    }
}
