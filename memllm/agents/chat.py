"""ChatAgent: unlimited dialogue over a MemLLM, with SCM-style text memory that persists across runs.

Each turn: the controller recalls flash memory (recent turns) and, when its gate fires, archived
records within a token budget; the prompt is the system prompt + recalled memory + recent turns + the
message, always within the model's window; the answer streams; both turns are stored. Long turns get
an LLM-written summary when stored (after the answer, not on its path).

Modes: "text" (above). "kv": the dialogue itself is streamed into a context-memory session (InfLLM-
style KV memory, memllm.session), turn by turn, and every answer continues that stream. The session is
saved after every answer (the units cut since the last save are appended, memllm.snapshot) in
`<store>/kv/<hash of the exact namespace>/` (memllm.paths: two users never share it), under a lock
per user that a second process of the same user waits for (and says so), and restored by the next
agent of the same user; a torn or foreign snapshot (other weights) gives a one-line warning and is
rebuilt from the user's turns in the text memory. Before each turn the memory the turn needs is
checked against the process's limit (MemoryLimitError, saying what to do). Recalled memory is placed
in the turn in every mode: "kv" recalls the user's fact records only (the statements extracted from
the user's own turns of the stream), "hybrid" every kind of record of the text memory, for recall
across sessions and beyond what KV retrieval finds. The kv stream keeps what the user said (without
the recalled memory placed in the turn); the model's own answers stay out of it unless `kv_answers`:
the 135M model copies an earlier answer of the stream into every later one (ten facts told, then
asked: 0/10 with answers in the stream, 7/10 without: benchmarks/RESULTS.md, issue 18). A turn whose
recalled memory holds one of the user's fact records is answered from that fact alone (the text-mode
prompt), not from the stream, unless `stream_with_facts`: a stream of many similar statements competes
with the recalled fact, and the 135M model copies another value of the stream instead ('The answer is:
bluefern42' for the favourite colour; ten facts in hybrid mode: 6/10 reading the stream, 9/10 from the
fact alone, issue 18). The stream still closes the turn (what the user said stays in it); it answers
every turn that recalls no fact. Turns are stored in the text memory in every mode. Answers from the
stream decode greedily.

Prompt (issue 18, measured in benchmarks/RESULTS.md): the model's own default system prompt unless
one is given; recalled memory as short dated facts under MEMORY_HEADER, right before the message,
and after a question with a fact recalled FACT_ASK. A question that asks for a recalled current fact's
subject and nothing else (agents.fact_answer) is answered starting with that fact told back through its
value ("Your favourite colour is teal"), the model writing what follows (an llm whose chat_stream takes
answer_prefix; `answer_fact` names the record): the 135M model refused "favourite X" questions ("as a
chatbot, I don't have personal preferences") and invented placeholder values with the fact in its
prompt (issue 18). What is stored: the user's turn always; user statements of fact also as fact records (agents.facts,
rules), with the turn as evidence and supersession by subject (agents.factbook); the answer only when
it ran to its end and is not degenerate (agents.quality), so a failed reply is never recalled.

Knows nothing of the CLI; the store and controller come from memllm.memory_stores / agents.controller.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from memllm.agents.controller import ControllerConfig, MemoryController, Recall
from memllm.agents.fact_answer import answer_start, asked_fact, asks_something
from memllm.agents.factbook import FactBook
from memllm.agents.facts import Fact, asks, extract_facts
from memllm.agents.quality import degenerate
from memllm.config import TEXT_SELECTORS, MemoryConfig
from memllm.errors import BusyError, ConfigError, SnapshotError, UnsupportedModelError
from memllm.generation import RepetitionGuard, StopScanner
from memllm.memory_stores.records import MemoryRecord, MemoryStore

MEMORY_MODES = ("text", "kv", "hybrid")
# kv_generate(session, ids, max_new_tokens, guard, query) -> the answer's text pieces
KvGenerate = Callable[[Any, list[int], int, "RepetitionGuard | None", str], Iterator[str]]
# text_generate(ids, max_new_tokens, guard) -> a greedy reply's text pieces (a rendered prompt's)
TextGenerate = Callable[[list[int], int, "RepetitionGuard | None"], Iterator[str]]
DEFAULT_SYSTEM: str | None = None  # None: the model's own default system prompt (its chat template's)
MEMORY_HEADER = "Facts I told you before:"
SUMMARY_PROMPT = "Summarize the following text in one short sentence, keeping names and numbers:\n\n"
# After a question answered from a recalled fact (chat_fact_answer_probe, thirty questions of varied
# wording: 23/30 with it, 16/30 without; a system prompt saying the facts are the user's: 12/30).
FACT_ASK = "Answer from the fact above in one short sentence."
FACT_ASK_MANY = "Answer from the facts above in one short sentence."  # more than one record recalled
CHAT_MAX_RECORDS = 1  # recalled records per turn: one short fact (chat_prompt_probe: 9/10 vs 4/10 at k=3)
KV_LIMIT_HINT = (
    "continue this user's chat with --memory text (its text memory keeps every turn), lower "
    "--memory-tokens (hybrid), or give the process more memory"
)


def build_messages(system: str | None, message: str, recall: Recall | None) -> list[dict[str, str]]:
    """The chat for one turn: the system prompt (none given: the template's default), recent turns,
    then the message with the recalled memory placed right before it (what the 135M model uses best:
    measured in benchmarks/RESULTS.md) and, after a question with a fact recalled, FACT_ASK."""
    msgs = [{"role": "system", "content": system}] if system else []
    for rec in recall.flash if recall is not None else []:
        role = rec.metadata.get("role", "user")
        msgs.append({"role": role if role in ("user", "assistant") else "user", "content": rec.text})
    if recall is not None and recall.memory_text:
        ask = ""
        if recalls_fact(recall) and asks_something(message):
            ask = "\n" + (FACT_ASK if len(recall.used) == 1 else FACT_ASK_MANY)
        message = f"{MEMORY_HEADER}\n{recall.memory_text}\n\n{message}{ask}"
    msgs.append({"role": "user", "content": message})
    return msgs


def start_from_fact(message: str, recall: Recall | None) -> tuple[MemoryRecord | None, str]:
    """The recalled fact record the message asks for (agents.fact_answer: a current fact whose subject
    the question names, and nothing else; None if none) and the text the answer starts with: that fact
    told back through its value ("Your favourite colour is teal"; "" when there is none). The 135M model
    refuses a question about the user's tastes, or invents a placeholder value, with the fact in its
    prompt (benchmarks/RESULTS.md, issue 18)."""
    record = asked_fact(message, [it.record for it in recall.used]) if recall is not None else None
    start = answer_start(record) if record is not None else None
    return (record, start) if start else (None, "")


def recalls_fact(recall: Recall | None) -> bool:
    """Whether the memory recalled for a turn holds one of the user's fact records."""
    return recall is not None and any(it.record.kind == "fact" for it in recall.used)


def user_namespace(user: str) -> str:
    if not user or not user.strip():
        raise ConfigError("a chat user name must be non-empty (e.g. --user alice)")
    return f"user:{user.strip()}"


class ChatAgent:
    """Chat with memory. `llm` is a MemLLM (or anything with chat_stream, chat, count_tokens, trained_len)."""

    def __init__(
        self,
        llm: Any,
        store: MemoryStore,
        *,
        user: str = "default",
        memory: str = "text",
        system: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        controller: ControllerConfig | None = None,
        summarize: bool = True,
        context_memory: MemoryConfig | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram: int = 0,
        facts: Callable[[str], list[Fact]] | None = extract_facts,
        notify: Callable[[str], None] | None = None,
        lock_timeout: float | None = None,
        kv_answers: bool = False,
        stream_with_facts: bool = False,
        kv_generate: KvGenerate | None = None,
        model_lock: AbstractContextManager | None = None,
        text_generate: TextGenerate | None = None,
    ) -> None:
        """notify(message): where one-line notices go (waiting for another process, a snapshot
        rebuilt); default: warnings.warn. lock_timeout: how long to wait for another process holding
        this user's kv memory (None: as long as it takes; then BusyError). kv_answers: the model's
        answers are kept in the kv stream too (kv/hybrid; off by default: see the module's note).
        stream_with_facts: a turn that recalls a fact record is answered from the kv stream as well
        (off by default: the fact alone answers it; see the module's note). kv_generate(session, ids,
        max_new_tokens, guard, query) -> text pieces: how a turn answered from the kv stream is
        generated (default: session.generate; memllm serve: an EngineThread's, batched with other
        users' turns). model_lock: held around every model call the agent makes itself (a text-mode
        answer, a kv turn's own generation, closing a turn, a rebuild, a summary; default none), for a model
        shared by threads (memllm serve); kv_generate takes it itself. text_generate(ids, max_new_tokens,
        guard) -> text pieces: how a greedy answer from the prompt (text mode, or a turn a recalled fact
        answers) is generated from its rendered ids (default: llm.chat_stream under model_lock; memllm
        serve: an EngineThread's generate_text, batched with other users' answers)."""
        if memory not in MEMORY_MODES:
            raise ConfigError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {memory!r}")
        if not isinstance(kv_answers, bool):
            raise ConfigError(f"kv_answers must be True or False, got {kv_answers!r}")
        self.kv_answers = kv_answers
        if not isinstance(stream_with_facts, bool):
            raise ConfigError(f"stream_with_facts must be True or False, got {stream_with_facts!r}")
        self.stream_with_facts = stream_with_facts
        self.answered_from: str | None = None  # the latest turn's source: "stream" or "prompt"
        self.answer_fact: str | None = None  # the fact record the latest answer was started from (fact_turn)
        self._takes_prefix = "answer_prefix" in inspect.signature(llm.chat_stream).parameters
        self.llm = llm
        self.store = store
        self.user = user
        self.memory = memory
        self.system = system or DEFAULT_SYSTEM
        self.guard = RepetitionGuard(repetition_penalty, no_repeat_ngram)
        self.extract = facts
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        cfg = controller or self.default_controller_config(llm.trained_len, max_new_tokens)
        if memory == "kv":  # the dialogue is the stream; the text memory adds the user's facts only
            cfg = replace(cfg, kinds=("fact",))
        self.controller = MemoryController(
            store,
            user_namespace(user),
            count_tokens=llm.count_tokens,
            summarize=self._summarize if summarize else None,
            config=cfg,
        )
        self.controller.since = self.controller.clock()  # a new conversation: earlier turns come by recall
        self.facts = FactBook(store, self.controller.namespace)
        self.skipped: list[str] = []  # why answers were not stored (latest last)
        self.context_memory = context_memory
        self.notify = notify or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))
        self.lock_timeout = lock_timeout
        self.model_lock = model_lock if model_lock is not None else nullcontext()
        self.kv_generate = kv_generate or self._own_generate
        self.text_generate = text_generate
        self.session: Any = None
        self.kv_turns = 0  # answered turns in the kv stream
        self._lock: Any = None
        self._writer: Any = None
        self._unsaved = False
        if memory != "text":
            try:
                self.session = self._open_session()
            except BaseException:
                self._release()
                raise

    # ------------------------------------------------------------------ kv session
    def snapshot_path(self) -> Path | None:
        """`<store>/kv/<disk key of the exact namespace>`: one folder per user, never shared."""
        from memllm.paths import keyed

        root = getattr(self.store, "path", None)
        if root is None:
            return None
        return keyed(Path(root) / "kv", self.controller.namespace)

    def _acquire(self, path: Path) -> None:
        from filelock import FileLock, Timeout

        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path) + ".lock")
        try:
            self._lock.acquire(timeout=0)
            return
        except Timeout:
            self.notify(
                f"the kv memory of {self.user} is in use by another memllm process: waiting for it to finish"
            )
        try:
            self._lock.acquire(timeout=-1 if self.lock_timeout is None else self.lock_timeout)
        except Timeout as exc:
            raise BusyError(
                f"the kv memory of {self.user} stayed in use by another memllm process for "
                f"{self.lock_timeout:.0f} s: end that chat, or use --memory text"
            ) from exc

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _open_session(self) -> Any:
        from memllm.paths import label_folder
        from memllm.session import Session
        from memllm.snapshot import SnapshotWriter

        path = self.snapshot_path()
        if path is None:
            return self._new_session()
        self._acquire(path)
        namespace = self.controller.namespace
        label_folder(path, namespace, "kv memory")
        SnapshotWriter(path, namespace).remove_stale_temps()
        if (path / "manifest.json").exists():
            try:
                session, manifest = Session.restore_checked(self.llm, path, namespace, self._units_embedder())
            except SnapshotError as exc:
                self.notify(f"warning: {exc}; rebuilding the kv memory of {self.user} from its text records")
            else:
                session.limit_hint = KV_LIMIT_HINT
                self._writer = SnapshotWriter(path, namespace, manifest)
                self.kv_turns = int(manifest.get("extra", {}).get("turns", 0))
                return session
            self.session = self._new_session()
            self._writer = SnapshotWriter(path, namespace)
            with self.model_lock:
                self._rebuild_from_text()
            self.save()
            return self.session
        self._writer = SnapshotWriter(path, namespace)
        return self._new_session()

    def _units_embedder(self) -> Any:
        """The text store's embedder, for the kv session's text index over its units (the selectors that
        read one: config.TEXT_SELECTORS); None for other selectors or a store without one (the session's default then)."""
        memory = self.context_memory or getattr(self.llm, "memory", None)
        indexed = (memory.selector if memory is not None else MemoryConfig().selector) in TEXT_SELECTORS
        return getattr(self.store, "embedder", None) if indexed else None

    def _new_session(self) -> Any:
        """An empty kv session."""
        session = self.llm.session(self.context_memory, embedder=self._units_embedder())
        session.limit_hint = KV_LIMIT_HINT
        return session

    def _rebuild_from_text(self) -> None:
        """Stream the user's stored turns (text memory, oldest first) into the kv session as stream()
        leaves them: each user turn closed, with its stored answer only when kv_answers, a question
        without its answer left out."""
        pending: str | None = None
        for rec in self.store.list(self.controller.namespace, filters={"kind": "turn"}):
            role = rec.metadata.get("role")
            if role == "user":
                if pending is not None:  # its answer was not kept: the turn stays, without one
                    self._feed_unanswered(pending)
                    self.kv_turns += 1
                pending = rec.text
            elif role == "assistant" and pending is not None and self.kv_answers:
                turn = [{"role": "user", "content": pending}]
                self.session.feed(self._segment(turn))
                self.session.feed(rec.text)
                self._close_turn(turn, rec.text)
                self.kv_turns += 1
                pending = None
        if pending is not None:
            self._feed_unanswered(pending)
            self.kv_turns += 1

    def _feed_unanswered(self, said: str) -> None:
        """A user's turn whose answer is not in the stream: closed without one; a question not at all
        (as stream() leaves it: _close_kv_turn)."""
        if not asks(said):
            self.session.feed(self._segment([{"role": "user", "content": said}], generation=False))

    def repair(self) -> dict[str, Any]:
        """Rebuild this user's kv memory from their text records, whatever its snapshot holds, and save
        it (`memllm memory repair`). Returns kv_status() of the rebuilt memory."""
        from memllm.snapshot import SnapshotWriter

        path = self.snapshot_path()
        if self.session is None or path is None:
            raise ConfigError("repair rebuilds kv memory: open the chat with memory kv or hybrid and a store")
        self.session = self._new_session()
        self.kv_turns = 0
        self._writer = SnapshotWriter(path, self.controller.namespace)
        with self.model_lock:
            self._rebuild_from_text()
        self.save()
        return self.kv_status() or {}

    def save(self) -> None:
        """Commit the kv session (the new units and the window) to its snapshot folder."""
        if self._writer is not None and self.session is not None and self.session.cache.seen_tokens > 0:
            self._writer.save(self.session, {"turns": self.kv_turns, "user": self.user})
            self._unsaved = False

    def kv_status(self) -> dict[str, Any] | None:
        """Tokens and answered turns in the kv stream (None in text mode)."""
        if self.session is None:
            return None
        return {"tokens": self.session.cache.seen_tokens, "turns": self.kv_turns}

    def close(self) -> None:
        """Save what is not saved yet and let another process have this user's kv memory."""
        try:
            if self._unsaved:
                self.save()
        finally:
            if self.session is not None and hasattr(self.session, "close"):
                self.session.close()  # its host memory no longer counts against a budget
            self._release()

    def _render(self, messages: list[dict[str, str]], generation: bool) -> str:
        return self.llm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=False
        )

    def _system_msgs(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def _segment(self, turn: list[dict[str, str]], generation: bool = True) -> str:
        """The chat-template text of `turn` as a continuation of the stream (system prompt only once:
        what follows an earlier exchange, whatever system prompt the template writes by default)."""
        system = self._system_msgs()
        if self.session.cache.seen_tokens == 0:
            return self._render(system + turn, generation)
        before = [*system, {"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
        prefix = self._render(before, False)
        full = self._render(before + turn, generation)
        if not full.startswith(prefix):
            raise UnsupportedModelError(
                f"the chat template of {getattr(self.llm, 'name', 'this model')} does not render turns "
                "incrementally, which kv memory needs: use --memory text"
            )
        return full[len(prefix) :]

    @staticmethod
    def _kv_turn(text: str, recall: Recall | None) -> list[dict[str, str]]:
        memory = recall.memory_text if recall is not None else ""
        content = f"{MEMORY_HEADER}\n{memory}\n\n{text}" if memory else text
        return [{"role": "user", "content": content}]

    def _close_turn(self, turn: list[dict[str, str]], answer: str) -> None:
        """Feed what the template writes after an answer (e.g. `<|im_end|>\\n`): the stream stays well-formed."""
        system = self._system_msgs()
        opened = self._render(system + turn, True)
        closed = self._render([*system, *turn, {"role": "assistant", "content": answer}], False)
        tail = closed[len(opened) :] if closed.startswith(opened) else ""
        if tail.startswith(answer) and tail[len(answer) :]:
            self.session.feed(tail[len(answer) :])
        else:
            self.session.feed_ids([self.llm.tokenizer.eos_token_id])

    def _close_kv_turn(
        self, turn: list[dict[str, str]], said: str, answer: str, why: str | None, before: tuple
    ) -> None:
        """Close the turn in the kv stream, which keeps what the user `said` (not the memory recalled
        into the turn) and, with kv_answers, an answer fit to be remembered (`why` None: the text
        memory's rule, _unfit). Otherwise the answer is rolled out of the stream and the user's turn
        stays, closed without one: the 135M model copies an earlier answer of the stream into every
        later turn (issue 18: a looping answer 'I'm so sorry to hear that.' or a fluent unhelpful one,
        0/10 recalled). A question whose answer is not kept leaves nothing in the stream (as
        Session.ask): left unanswered there, the model answered it again in place of the next question
        ('The locker code is 4417.' to 'What is my sister's name?'). The text memory keeps both turns."""
        plain = [{"role": "user", "content": said}]
        keep = why is None and self.kv_answers
        if keep and turn == plain:
            self._close_turn(turn, answer)
            return
        self.session.rewind(before)
        if not keep:
            self._feed_unanswered(said)  # a question left unanswered is what the model answers next
            return
        self.session.feed(self._segment(plain))
        self.session.feed(answer)
        self._close_turn(plain, answer)

    @staticmethod
    def _unfit(answer: str, finished: bool) -> str | None:
        """Why an answer is not remembered (in the text memory, nor in the kv stream), or None."""
        return "interrupted" if not finished else degenerate(answer) if answer else "empty"

    @staticmethod
    def default_controller_config(window: int, max_new_tokens: int) -> ControllerConfig:
        """Budgets as shares of the window left after the answer: memory 1/4, recent turns 1/2; at most
        CHAT_MAX_RECORDS recalled records, and no recent turns on a turn that recalls memory (the layout
        the 135M model answers from: RESULTS.md)."""
        room = max(window - max_new_tokens - 128, 64)
        return ControllerConfig(
            memory_tokens=room // 4,
            flash_tokens=room // 2,
            max_records=CHAT_MAX_RECORDS,
            flash_with_memory=False,
        )

    def _summarize(self, text: str) -> str:
        with self.model_lock:  # the store's summary of a long turn is a model call
            return self.llm.chat(
                [{"role": "user", "content": SUMMARY_PROMPT + text}], max_new_tokens=48, temperature=0.0
            )

    def _locked(self, pieces: Iterator[str]) -> Iterator[str]:
        """`pieces` read holding model_lock (released when they end or the reader stops)."""
        with self.model_lock:
            yield from pieces

    def _generated_text(
        self, messages: list[dict[str, str]], limit: int, guard: RepetitionGuard | None, prefix: str
    ) -> Iterator[str]:
        """llm.chat_stream's greedy reply (its prompt, its answer_prefix), through text_generate."""
        ids = self.llm.reply_ids(messages, limit, prefix)
        if prefix:
            yield prefix
        yield from self.text_generate(ids, limit, guard)

    def _own_generate(
        self, session: Any, ids: list[int], limit: int, guard: RepetitionGuard | None, query: str
    ) -> Iterator[str]:
        """The default kv_generate: the session's own greedy decode, holding model_lock."""
        return self._locked(session.generate(ids, max_new_tokens=limit, guard=guard, query=query))

    # ------------------------------------------------------------------ prompt
    def build_messages(self, message: str, recall: Recall) -> list[dict[str, str]]:
        return build_messages(self.system, message, recall)

    # ------------------------------------------------------------------ turns
    def stream(
        self,
        message: str,
        *,
        stop: list[str] | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[str]:
        """Stream the answer to `message`, ending before the first `stop` string if one appears.

        Both turns are stored when the stream ends, also when the caller stops reading early (the
        answer as far as it was streamed); in kv/hybrid mode the turn is closed in the stream too.
        When generation itself is interrupted by an exception (SIGTERM, Ctrl-C, an error inside the
        model), the kv stream is rolled back to before the turn (a forward pass cut half-way leaves
        the layers disagreeing) and the half answer is neither kept nor saved.
        """
        text = message.strip()
        if not text:
            raise ConfigError("a chat message must be non-empty")
        limit = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        recall = self.controller.recall(text)  # kv: the user's fact records only (see __init__)
        guard = self.guard if self.guard.active else None
        from_stream = self.session is not None and (self.stream_with_facts or not recalls_fact(recall))
        self.answer_fact = None
        self.answered_from = "stream" if from_stream else "prompt"
        scanner = StopScanner(stop)  # checked before kv_generate queues the turn: nothing fails between
        shown = ""
        before = self.session.mark() if self.session is not None else None  # before kv_generate queues the turn
        if from_stream:
            turn = self._kv_turn(text, recall)
            ids = self.session.encode(self._segment(turn))
            # before the turn starts, not half-way: its tokens, the prompt's model call, the save's copy
            self.session.check_room(
                len(ids) + limit + 8, 2 * self.session.window_bytes(), call_tokens=len(ids)
            )
            # the selection matches the user's words, not the turn's template and recalled facts
            source = self.kv_generate(self.session, ids, limit, guard, text)
        else:  # text mode, or a turn the recalled fact answers (its kv turn is closed all the same)
            turn = []
            opts: dict[str, Any] = (
                {"repetition_penalty": self.guard.penalty, "no_repeat_ngram": self.guard.n} if guard else {}
            )
            fact, prefix = start_from_fact(text, recall)
            if fact is not None and self._takes_prefix:  # an llm without answer_prefix answers as it is
                opts["answer_prefix"] = prefix
                self.answer_fact = fact.id
            temp = self.temperature if temperature is None else temperature
            messages = self.build_messages(text, recall)
            if self.text_generate is not None and temp == 0:
                source = self._generated_text(messages, limit, guard, opts.get("answer_prefix", ""))
            else:
                source = self._locked(
                    self.llm.chat_stream(messages, max_new_tokens=limit, temperature=temp, **opts)
                )
        interrupted = False
        finished = False
        try:
            for piece in source:
                out, stopped = scanner.push(piece)
                if out:
                    shown += out
                    yield out
                if stopped:
                    finished = True
                    return
            tail = scanner.flush()
            if tail:
                shown += tail
                yield tail
            finished = True
        except GeneratorExit:  # the caller stopped reading: the stream is whole, close the turn
            raise
        except BaseException:
            interrupted = True
            raise
        finally:
            source.close()  # a turn still generating ends here (an EngineThread's leaves the batch)
            with self.model_lock:  # the store's writes below take it only to summarize (_summarize)
                if self.session is not None and before is not None and interrupted:
                    self.session.rewind(before)
                elif self.session is not None:
                    why = self._unfit(shown.strip(), finished)
                    self._close_kv_turn(turn, text, shown, why, before)
                    self.kv_turns += 1
                    self._unsaved = True
            self._store_turn(text, shown.strip(), finished and not interrupted)
            if self.session is not None and not interrupted:
                self.save()  # after every answer: a killed process loses no answered turn

    def _store_turn(self, text: str, answer: str, finished: bool) -> None:
        """The user's turn and its facts; the answer only when it finished and is not degenerate."""
        turn_id = self.controller.remember(text, kind="turn", role="user")
        if self.extract is not None:
            turn = self.store.get(turn_id)
            at = turn.created_at if turn is not None else None
            for fact in self.extract(text):
                self.facts.add(fact, at=at, evidence=turn_id)
        why = self._unfit(answer, finished)
        if why is None:
            self.controller.remember(answer, kind="turn", role="assistant")
        else:
            self.skipped.append(why)

    def chat(self, message: str) -> str:
        return "".join(self.stream(message))

    def last_recall(self) -> Recall | None:
        """What the controller used for the latest answer, with scores and reasons."""
        return self.controller.last_recall()

    def history(self, limit: int = 50) -> list[MemoryRecord]:
        return self.store.list(
            self.controller.namespace, filters={"kind": "turn"}, limit=limit, newest_first=True
        )[::-1]
