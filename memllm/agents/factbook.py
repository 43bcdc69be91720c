"""The lifecycle of a user's facts in a `MemoryStore`: told, superseded, told again; and their history.

A fact is a record of kind "fact" whose metadata holds its `subject` (the supersession key, e.g.
"home city"), `value`, `valid_from` / `valid_to` (UNIX seconds; valid_to None while current), the
`evidence` turn id it came from, `superseded_by`, and `changes`: every event of its life as
{"at", "event" (told / superseded / told again / added), "turn", "by"}. A newer fact on the same subject
ends the older one (valid_to, superseded_by) and never erases it; telling an old value again makes
that record current again. Nothing here is deleted: forgetting is the store's `delete`.

Knows nothing of prompts, models or the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memllm.agents.facts import Fact
from memllm.memory_stores.records import MemoryRecord, MemoryStore


def is_current(record: MemoryRecord) -> bool:
    """A fact record not superseded (every non-fact record counts as current)."""
    return record.kind != "fact" or record.metadata.get("valid_to") is None


@dataclass(frozen=True)
class FactChange:
    """One line of `memory history`: what happened to which fact, when, from which turn."""

    at: float
    event: str
    subject: str
    value: str
    record_id: str
    turn: str | None
    by: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "event": self.event,
            "subject": self.subject,
            "value": self.value,
            "record": self.record_id,
            "turn": self.turn,
            "by": self.by,
        }


class FactBook:
    """Facts of one namespace. `clock` gives the time of a change when the caller gives none."""

    def __init__(self, store: MemoryStore, namespace: str, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.namespace = namespace
        self.clock = clock

    def facts(self, subject: str | None = None, *, current_only: bool = False) -> list[MemoryRecord]:
        """Fact records, oldest first (of one subject, and only current ones, if asked)."""
        flt: dict[str, Any] = {"kind": "fact"}
        if subject is not None:
            flt["metadata"] = {"subject": subject}
        recs = self.store.list(self.namespace, filters=flt)
        return [r for r in recs if is_current(r)] if current_only else recs

    def add(
        self,
        fact: Fact,
        *,
        at: float | None = None,
        evidence: str | None = None,
        extractor: str = "rules",
        importance: float = 0.8,
    ) -> tuple[str, list[str]]:
        """Store `fact` as current; end the current facts of its subject that say otherwise.
        Returns (the fact's record id, the ids it superseded)."""
        at = self.clock() if at is None else float(at)
        event = "added" if evidence is None else "told"
        meta = {
            "subject": fact.subject,
            "value": fact.value,
            "valid_from": at,
            "valid_to": None,
            "evidence": evidence,
            "superseded_by": None,
            "extractor": extractor,
            "changes": [{"at": at, "event": event, "turn": evidence, "by": None}],
        }
        record = MemoryRecord(
            fact.text,
            namespace=self.namespace,
            kind="fact",
            importance=importance,
            created_at=at,
            source=evidence,
            metadata=meta,
        )
        rid = self.store.add(record)
        if rid != record.id:  # the same fact was stored before
            stored = self.store.get(rid)
            if stored is not None and not is_current(stored):
                m = dict(stored.metadata)
                changes = [
                    *m.get("changes", []),
                    {"at": at, "event": "told again", "turn": evidence, "by": None},
                ]
                m.update(valid_from=at, valid_to=None, superseded_by=None, evidence=evidence, changes=changes)
                self.store.update(rid, metadata=m)
            elif stored is not None:
                return rid, []
        ended = []
        for old in self.facts(fact.subject, current_only=True):
            if old.id == rid:
                continue
            m = dict(old.metadata)
            changes = [*m.get("changes", []), {"at": at, "event": "superseded", "turn": evidence, "by": rid}]
            m.update(valid_to=at, superseded_by=rid, changes=changes)
            self.store.update(old.id, metadata=m)
            ended.append(old.id)
        return rid, ended

    def history(self, subject: str | None = None) -> list[FactChange]:
        """Every change of every fact (of one subject), in time order."""
        out = []
        for rec in self.facts(subject):
            m = rec.metadata
            for ch in m.get("changes", []):
                out.append(
                    FactChange(
                        float(ch.get("at", rec.created_at)),
                        str(ch.get("event", "told")),
                        str(m.get("subject", "")),
                        str(m.get("value", rec.text)),
                        rec.id,
                        ch.get("turn"),
                        ch.get("by"),
                    )
                )
        return sorted(out, key=lambda c: (c.at, c.event == "superseded"))


__all__ = ["FactBook", "FactChange", "is_current"]
