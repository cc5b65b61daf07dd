"""Who does something: the name the audit log gives them, what they may do, and where they called from.

Every use case (`appliance.access.policy`, `appliance.documents`, `appliance.answers.asking`, backup and
restore) takes an `Actor`, checks it with `Actor.require`, and writes its own audit records with
`Actor.record`, so web routes, pages and CLI commands only parse, call and render. The web builds one per
request (`web.caller`); the CLI acts as `Actor.operator()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from appliance.access import audit
from appliance.access.rbac import OPERATOR, Access, access_for
from appliance.access.users import Principal
from appliance.errors import ApplianceError, Forbidden


@dataclass(frozen=True)
class Actor:
    name: str  # as the audit log names them: a user name, or audit.LOCAL_OPERATOR
    id: int | None  # the user's id (0: the local operator)
    access: Access
    address: str | None = None  # the client address of a web request, kept in each audit record

    @classmethod
    def operator(cls) -> Actor:
        """The local operator: the CLI, or a request with the local CLI token."""
        return cls(audit.LOCAL_OPERATOR, 0, OPERATOR)

    @classmethod
    def of(cls, engine: Engine, principal: Principal, address: str | None = None) -> Actor:
        """The caller behind a principal, with their access read from the database now."""
        name, actor_id = audit.actor_of(principal)
        return cls(name, actor_id, access_for(engine, principal), address)

    def may(self, action: str, collection: str | None = None) -> bool:
        return self.access.may(action, collection)

    def require(self, action: str, collection: str | None = None, *, message: str | None = None) -> None:
        """Raise Forbidden unless the actor may do `action` (the edge records the refusal)."""
        if not self.may(action, collection):
            raise Forbidden(message or "you are not allowed to do this")

    def record(
        self, engine: Engine, action: str, *, target: str | None = None, outcome: str = "ok", **details: Any
    ) -> None:
        """One audit record of something this actor did (or was refused, or failed to do)."""
        audit.record(
            engine,
            self.name,
            action,
            actor_id=self.id,
            target=target,
            outcome=outcome,
            details=details,
            address=self.address,
        )

    def refuse(self, engine: Engine, action: str, error: ApplianceError, *, target: str | None = None, **details):
        """Record a refusal under the use case's own audit action and return the error, marked as audited so
        the edge writes no generic record too: `raise actor.refuse(...)`."""
        self.record(engine, action, target=target, outcome="denied", reason=error.message[:200], **details)
        error.audited = True
        return error
