"""API tokens: random secrets shown once at creation; the database keeps only their
SHA-256 (enough for 256-bit random secrets: there is nothing to brute-force). Roles:
`reader` (every read) and `admin` (reads, feedback, host administration).

Requests authenticate with `Authorization: Bearer <token>`. The dashboard's browser
sessions may instead carry the token in an HttpOnly cookie set by /login; the cookie
is honoured for GET and HEAD only, so a cross-site form cannot write with it.

Missing or unknown token: 401 with a WWW-Authenticate header. A reader on a write
endpoint: 403. `serve.public_reads` lets reads through without a token (a token that
is sent must still be valid).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from validator.store import Store

PREFIX = "vt_"  # makes a leaked token recognisable (secret scanners, logs)
COOKIE = "validator_token"
bearer = HTTPBearer(auto_error=False, scheme_name="token",
                    description="A token from `validator tokens create --role admin|reader`.")


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def create_token(store: Store, role: str, name: str) -> tuple[str, dict]:
    """A new token: (the secret, to show once; the stored row, which holds only its hash)."""
    secret = PREFIX + secrets.token_urlsafe(32)
    return secret, store.add_api_token(name, role, token_hash(secret))


@dataclass(frozen=True)
class Principal:
    name: str
    role: str  # admin | reader | public (no token, reads made public by the config)

    @property
    def by(self) -> str:
        """How admin actions record who did them."""
        return f"token {self.name}"


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = 'Bearer realm="validator"' + (f', error="{error}"' if error else "")
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


def identify(request: Request, creds: HTTPAuthorizationCredentials | None) -> Principal | None:
    """The token's owner; None without a token; 401 for a token that is not (or no
    longer) valid."""
    secret = creds.credentials if creds else None
    if secret is None and request.method in ("GET", "HEAD"):
        secret = request.cookies.get(COOKIE)
    if not secret:
        return None
    found = request.app.state.web.store.api_token(token_hash(secret))
    if found is None:
        raise _unauthorized("invalid or revoked token", "invalid_token")
    return Principal(found["name"], found["role"])


def _token_or_public(request: Request, creds, public: bool) -> Principal:
    who = identify(request, creds)
    if who is not None:
        return who
    if public:
        return Principal("public", "public")
    raise _unauthorized("a reader or admin token is required (Authorization: Bearer <token>)")


def reader(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    """Any valid token, or nobody when `serve.public_reads` is set."""
    return _token_or_public(request, creds, request.app.state.web.config.public_reads)


def llm_caller(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    """/validator/v1/llm: any valid token, or nobody when `serve.llm.public` is set (it
    costs model time, so public reads do not open it)."""
    return _token_or_public(request, creds, request.app.state.web.config.llm.public)


def admin(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    who = identify(request, creds)
    if who is None:
        raise _unauthorized("an admin token is required (Authorization: Bearer <token>)")
    if who.role != "admin":
        raise HTTPException(403, f"token {who.name!r} has role {who.role}; this needs an admin token")
    return who
