"""Probes for supervisors and load balancers: `/health` (the process serves) and `/ready` (its stores answer).

Both are open to anyone and say nothing beyond their status; why a store did not answer goes to the log.
Readiness does not depend on models: a box with no generation model installed answers questions
extractively and is ready.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

log = logging.getLogger(__name__)
router = APIRouter()
READY_TIMEOUT_S = 5.0


def _database_answers(engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _vector_store_answers(index) -> None:
    index.client.heartbeat()
    index.vectors.count()  # reaches the collection's storage, not only the client


async def stores_ready(state) -> bool:
    """True when the database and the vector store both answer within READY_TIMEOUT_S."""
    checks = (
        ("database", _database_answers, state.db),
        ("vector store", _vector_store_answers, state.ingestor.index),
    )
    for name, check, target in checks:
        try:
            await asyncio.wait_for(asyncio.to_thread(check, target), READY_TIMEOUT_S)
        except Exception as exc:
            log.warning("not ready: the %s does not answer: %s", name, str(exc) or type(exc).__name__)
            return False
    return True


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request):
    if await stores_ready(request.app.state):
        return {"status": "ready"}
    return JSONResponse({"status": "not ready"}, status_code=503)
