"""The per-user memory API of `memllm serve`: add, list, search, get, history, forget, export, import.

Every route names a user; `namespace_for(request, user)` authorises the caller for that user (or raises
the HTTP error) and gives the store namespace. Writes are committed before the response. Knows nothing
of keys, the model or chat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from memllm.errors import StoreError
from memllm.memory_stores.records import MemoryRecord


class AddRequest(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)
    kind: str = "fact"
    importance: float = Field(default=0.5, ge=0.0, le=1.0)


class ImportRequest(BaseModel):
    records: list[dict[str, Any]]


def memory_router(store: Any, namespace_for: Callable[[Request, str], str],
                  drop_session: Callable[[str], None]) -> APIRouter:
    router = APIRouter()

    def own(record_id: str, namespace: str) -> MemoryRecord:
        rec = store.get(record_id)
        if rec is None or rec.namespace != namespace:
            raise HTTPException(404, f"record {record_id!r} not found")
        return rec

    @router.post("/v1/memory/{user}/records", status_code=201)
    def add(user: str, body: AddRequest, request: Request) -> dict[str, Any]:
        namespace = namespace_for(request, user)
        if not body.text.strip():
            raise HTTPException(400, "text must be non-empty")
        rec = MemoryRecord(text=body.text, namespace=namespace, kind=body.kind, importance=body.importance)
        rid = store.add(rec)  # committed before we answer
        return {"id": rid}

    @router.get("/v1/memory/{user}/records")
    def list_records(user: str, request: Request, limit: int = 50, kind: str | None = None) -> dict[str, Any]:
        namespace = namespace_for(request, user)
        if limit < 1 or limit > 10_000:
            raise HTTPException(400, "limit must be in 1..10000")
        recs = store.list(namespace, filters={"kind": kind} if kind else None, limit=limit, newest_first=True)
        return {"count": store.count(namespace), "records": [r.to_dict() for r in recs[::-1]]}

    @router.get("/v1/memory/{user}/search")
    def search(user: str, q: str, request: Request, k: int = 5) -> dict[str, Any]:
        namespace = namespace_for(request, user)
        if not q.strip() or k < 1 or k > 100:
            raise HTTPException(400, "q must be non-empty and k in 1..100")
        hits = store.search(q, k, namespace=namespace)
        return {"results": [{"record": h.record.to_dict(), "score": float(h.score)} for h in hits]}

    @router.get("/v1/memory/{user}/records/{record_id}")
    def get(user: str, record_id: str, request: Request) -> dict[str, Any]:
        return own(record_id, namespace_for(request, user)).to_dict()

    @router.get("/v1/memory/{user}/history")
    def history(user: str, request: Request, limit: int = 50) -> dict[str, Any]:
        namespace = namespace_for(request, user)
        recs = store.list(namespace, filters={"kind": "turn"}, limit=max(1, min(limit, 10_000)), newest_first=True)
        return {"turns": [r.to_dict() for r in recs[::-1]]}

    @router.delete("/v1/memory/{user}/records/{record_id}")
    def forget(user: str, record_id: str, request: Request) -> dict[str, Any]:
        own(record_id, namespace_for(request, user))
        return {"deleted": store.delete([record_id])}

    @router.delete("/v1/memory/{user}")
    def forget_all(user: str, request: Request) -> dict[str, Any]:
        namespace = namespace_for(request, user)
        drop_session(user)  # its chat session is closed before its records go
        return {"deleted": store.delete_namespace(namespace)}

    @router.get("/v1/memory/{user}/export")
    def export(user: str, request: Request) -> dict[str, Any]:
        namespace = namespace_for(request, user)
        recs = store.list(namespace, limit=1_000_000)
        return {"records": [r.to_dict() for r in recs]}

    @router.post("/v1/memory/{user}/import")
    def import_records(user: str, body: ImportRequest, request: Request) -> dict[str, Any]:
        namespace = namespace_for(request, user)
        try:
            recs = [MemoryRecord.from_dict({k: v for k, v in r.items() if k != "id"} | {"namespace": namespace}) for r in body.records]
        except (TypeError, ValueError, KeyError, StoreError) as exc:
            raise HTTPException(422, f"bad record: {exc}") from exc
        ids = store.add_many(recs) if recs else []
        return {"stored": len(ids)}

    return router
