"""A handler module for process-level deploy tests (``PGREACT_HANDLERS`` points here)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from pgreact import Event, Router

router = Router()


@router.on("source", name="deploy.noop")
async def noop(event: Event, session: AsyncSession) -> None:
    return None
