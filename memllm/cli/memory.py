"""`memllm memory list|search|show|add|history|forget|export|import|repair --user NAME`: inspect and edit memory.

Parse, call the store, render. Commands that need no embeddings open the store without loading the
embedding model (list, show, forget, export).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from memllm.cli import common

memory_app = typer.Typer(help="Inspect and edit a user's text memory.", no_args_is_help=True)

UserOpt = typer.Option(..., "--user", "-u", help="Whose memory (as given to `memllm chat --user`).")
StoreOpt = typer.Option(None, "--store", help="Memory store folder (default: $MEMLLM_HOME/memory).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON.")


def _ns(user: str) -> str:
    from memllm.agents.chat import user_namespace

    return user_namespace(user)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


READABLE_TIMES = ("created_at", "updated_at")
READABLE_META_TIMES = ("valid_from", "valid_to")


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _records_table(title: str, rows: list[tuple[Any, float | None]]) -> None:
    table = Table(title=title)
    for col in (
        "id",
        "kind",
        "role",
        "created",
        *(["score"] if any(s is not None for _, s in rows) else []),
        "text",
    ):
        table.add_column(col, overflow="fold" if col == "text" else "ellipsis", no_wrap=col != "text")
    for rec, score in rows:
        cells = [rec.id[:8], rec.kind, str(rec.metadata.get("role", "")), _when(rec.created_at)]
        if score is not None:
            cells.append(f"{score:.3f}")
        table.add_row(*cells, _short(rec.text))
    Console().print(table)


@memory_app.command("list")
@common.fail_on_error
def list_records(
    user: str = UserOpt,
    store: str | None = StoreOpt,
    kind: str | None = typer.Option(None, "--kind", help="Only this kind: turn, chunk, summary or fact."),
    limit: int = typer.Option(50, "--limit", min=1, max=1_000_000, help="Newest N records."),
    as_json: bool = JsonOpt,
) -> None:
    """List a user's records, oldest first (the newest --limit)."""
    with common.open_store(store, with_embedder=False) as s:
        filters = {"kind": kind} if kind else None
        recs = s.list(_ns(user), filters=filters, limit=limit, newest_first=True)[::-1]
        if as_json:
            typer.echo(
                json.dumps({"user": user, "count": s.count(_ns(user)), "records": [r.to_dict() for r in recs]})
            )
            return
        _records_table(f"memory of {user}: {s.count(_ns(user))} records", [(r, None) for r in recs])


@memory_app.command("search")
@common.fail_on_error
def search(
    query: str = typer.Argument(..., help="What to look for."),
    user: str = UserOpt,
    store: str | None = StoreOpt,
    k: int = typer.Option(5, "--k", "-k", min=1, max=10_000, help="How many results."),
    as_json: bool = JsonOpt,
) -> None:
    """Search a user's records by meaning."""
    with common.open_store(store, with_embedder=True) as s:
        hits = s.search(query, k, namespace=_ns(user))
        if as_json:
            typer.echo(
                json.dumps({"query": query, "results": [{"score": h.score, **h.record.to_dict()} for h in hits]})
            )
            return
        _records_table(f"memory of {user} for {query!r}", [(h.record, h.score) for h in hits])


@memory_app.command("show")
@common.fail_on_error
def show(
    record_id: str = typer.Argument(..., help="A record id or its first characters."),
    user: str = UserOpt,
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show one record in full."""
    with common.open_store(store, with_embedder=False) as s:
        rec = s.get(s.resolve_id(record_id, _ns(user)))
        data = rec.to_dict()
        if as_json:
            typer.echo(json.dumps(data))
            return
        for key, value in data.items():
            if key in READABLE_TIMES:
                value = _when(value)
            elif key == "metadata":
                value = {
                    k: _when(v) if k in READABLE_META_TIMES else v for k, v in value.items() if k != "changes"
                }
            typer.echo(f"{key}: {value}")


@memory_app.command("add")
@common.fail_on_error
def add(
    text: str = typer.Argument(..., help="A fact in the user's words, e.g. 'My locker code is 4417.'"),
    user: str = UserOpt,
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Add a fact to a user's memory (a newer fact on the same subject supersedes the older one)."""
    from memllm.agents.factbook import FactBook
    from memllm.agents.facts import Fact, extract_facts

    with common.open_store(store, with_embedder=True) as s:
        book = FactBook(s, _ns(user))
        facts = extract_facts(text) or [Fact(" ".join(text.lower().split()), text.strip(), text.strip())]
        out = []
        for fact in facts:
            rid, ended = book.add(fact)
            out.append(
                {"id": rid, "subject": fact.subject, "value": fact.value, "text": fact.text, "superseded": ended}
            )
        if as_json:
            typer.echo(json.dumps({"user": user, "added": out}))
            return
        for row in out:
            line = f"added {row['id'][:8]} ({row['subject']}: {row['value']})"
            if row["superseded"]:
                line += f"; it supersedes {', '.join(r[:8] for r in row['superseded'])}"
            typer.echo(line)


@memory_app.command("history")
@common.fail_on_error
def history(
    user: str = UserOpt,
    store: str | None = StoreOpt,
    subject: str | None = typer.Option(None, "--subject", help="Only this subject (e.g. 'home city')."),
    as_json: bool = JsonOpt,
) -> None:
    """What changed in a user's facts: when each was told, superseded or told again, and by which turn."""
    from memllm.agents.factbook import FactBook

    with common.open_store(store, with_embedder=False) as s:
        changes = FactBook(s, _ns(user)).history(subject)
        if as_json:
            typer.echo(json.dumps({"user": user, "changes": [c.to_dict() for c in changes]}))
            return
        typer.echo(f"fact history of {user}: {len(changes)} change(s)")
        for c in changes:
            where = f"fact {c.record_id[:8]}" + (f", from turn {c.turn[:8]}" if c.turn else "")
            where += f", by fact {c.by[:8]}" if c.by else ""
            typer.echo(f"{_when(c.at)}  {c.event:<10}  {c.subject}: {c.value}  ({where})")


@memory_app.command("forget")
@common.fail_on_error
def forget(
    record_ids: list[str] = typer.Argument(None, help="Record ids (or prefixes) to remove."),
    user: str = UserOpt,
    store: str | None = StoreOpt,
    everything: bool = typer.Option(False, "--all", help="Forget every record of this user."),
    as_json: bool = JsonOpt,
) -> None:
    """Remove records from the store and its index; --all removes every trace of the user (records,
    index file, the KV memory snapshot) and says what it removed."""
    with common.open_store(store, with_embedder=False) as s:
        if everything:
            from memllm.agents.forget import forget_user

            report = forget_user(s, user)
            removed, said, extra = report.records, report.describe(), report.to_dict()
        elif record_ids:
            removed = s.delete([s.resolve_id(r, _ns(user)) for r in record_ids])
            said, extra = f"forgot {removed} record(s) of {user}", {}
        else:
            print("error: give record ids to forget (see `memllm memory list`), or --all", file=sys.stderr)
            raise typer.Exit(2)
        held = removed > 0 and not s.wal_clean
        note = (
            f"their text stays in {s.path}/memory.db-wal until the other process reading this store "
            "(a running chat?) ends its read or closes the store"
        )
        if as_json:
            typer.echo(json.dumps({"forgotten": removed, **extra, **({"pending": note} if held else {})}))
        else:
            typer.echo(said + (f"; {note}" if held else ""))


@memory_app.command("export")
@common.fail_on_error
def export(
    dest: str = typer.Argument("-", help="JSONL file to write, or - for stdout."),
    user: str = UserOpt,
    store: str | None = StoreOpt,
) -> None:
    """Export a user's records as JSON lines."""
    with common.open_store(store, with_embedder=False) as s:
        n = s.export_jsonl(sys.stdout if dest == "-" else dest, namespace=_ns(user))
        if dest != "-":
            typer.echo(f"exported {n} record(s) of {user} to {dest}")


@memory_app.command("import")
@common.fail_on_error
def import_(
    src: str = typer.Argument(..., help="JSONL file written by `memllm memory export`, or - for stdin."),
    user: str = UserOpt,
    store: str | None = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Import records (into this user's memory), all or none; records already present are not added twice."""
    with common.open_store(store, with_embedder=True) as s:
        result = s.import_file(sys.stdin if src == "-" else src, namespace=_ns(user))
        if as_json:
            typer.echo(
                json.dumps(
                    {"imported": result.stored, **({"already_present": result.present} if result.present else {})}
                )
            )
        else:
            there = f" ({result.present} already there)" if result.present else ""
            typer.echo(f"imported {result.stored} record(s) for {user}{there}")


@memory_app.command("repair")
@common.fail_on_error
def repair(
    user: str = UserOpt,
    store: str | None = StoreOpt,
    model: str = typer.Option(None, "--model", "-m", help="The model the kv memory is for (default: chat's)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda..."),
    as_json: bool = JsonOpt,
) -> None:
    """Rebuild a user's kv chat memory from their text records (after a torn snapshot, or a model change)."""
    from memllm.agents.chat import ChatAgent
    from memllm.models import DEFAULT_MODEL

    llm = common.load_llm(model or DEFAULT_MODEL, device)
    with common.open_store(store, with_embedder=True) as s:
        agent = ChatAgent(llm, s, user=user, memory="kv", notify=common.status_printer())
        try:
            kv = agent.repair()
        finally:
            agent.close()
    if as_json:
        typer.echo(json.dumps({"user": user, **kv}))
    else:
        typer.echo(f"rebuilt the kv memory of {user}: {kv['turns']} turns, {kv['tokens']} tokens")
