"""DocumentQA on the tiny random Llama: read once, ask many (memory unchanged), evidence maps to the source."""

from __future__ import annotations

import shutil

import pytest
import torch

from memllm.agents import docqa as docqa_mod
from memllm.agents.doc_chunks import TokenizedDocument, chunk_spans
from memllm.agents.docqa import DocumentQA, default_memory
from memllm.documents import read_text
from memllm.errors import ConfigError, InputError, MemoryLimitError, SnapshotError
from memllm.memory_stores.embeddings import FakeEmbedder
from tests.docqa.conftest import boxes_text

QUESTIONS = ["What color is box 7?", "Where is box 3?", "Which box is blue?"]


def make(llm, mode: str, **kw) -> DocumentQA:
    kw.setdefault("chunk_tokens", 48)
    return DocumentQA(llm, mode, embedder=FakeEmbedder(), **kw)


def memory_state(qa: DocumentQA):
    st = qa.session.stats()
    return st["tokens_seen"], st["units"], qa.session.last_logits.clone()


def test_default_memory_fits_the_window():
    for trained in (256, 512, 2048, 4096, 8192, 32768):
        cfg = default_memory(trained).resolved(trained)  # raises if it does not fit
        assert cfg.block_size <= 128


def test_kv_read_once_ask_many_leaves_memory_unchanged(tiny_llm):
    qa = make(tiny_llm, "kv")
    calls = []
    report = qa.read(boxes_text(), name="boxes.txt", progress=lambda d, t: calls.append((d, t)))
    assert report.tokens == calls[-1][0] == calls[-1][1] and report.chunks == 0
    before = memory_state(qa)
    first = qa.ask(QUESTIONS[0])
    for q in QUESTIONS[1:] * 2:
        qa.ask(q)
    again = qa.ask(QUESTIONS[0])
    after = memory_state(qa)
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])
    assert first.text == again.text
    assert [e.to_dict() for e in first.evidence] == [e.to_dict() for e in again.evidence]
    assert first.mode == "kv" and first.seconds > 0


def test_kv_evidence_is_the_units_the_lookups_chose(tiny_llm):
    qa = make(tiny_llm, "kv")
    text = boxes_text()
    qa.read(text, name="boxes.txt")
    td = qa.docs[0]
    lookups = qa.session.stats()["lookups"]
    answer = qa.ask(QUESTIONS[0])
    asked_lookups = qa.session.stats()["lookups"] - lookups
    assert asked_lookups > 0
    units = [e for e in answer.evidence if e.kind == "unit"]
    # every layer read the units the question chose: the two layers' groups show the same, once
    assert units and {e.group for e in units} == {"layers 0-1"} and len(units) == len({e.start for e in units})
    cfg = qa.memory
    seg_start = qa.segments[0][0]
    for ev in units:
        assert ev.text == text[ev.start : ev.end]
        assert ev.lines == td.doc.lines(ev.start, ev.end)
        assert 0 < ev.score <= 1
        # The span is exactly one unit: block_size tokens starting at n_init + u * block_size.
        tok0 = td.starts.index(ev.start) + seg_start
        assert (tok0 - cfg.n_init) % cfg.block_size == 0
        unit = (tok0 - cfg.n_init) // cfg.block_size
        assert ev.text == tiny_llm.tokenizer.decode(
            td.ids[tok0 - seg_start : tok0 - seg_start + cfg.block_size]
        )
        assert unit < qa.session.stats()["units_per_layer"]
    # Recorder sees exactly the lookups the cache counted, and the class is left untouched.
    rec = docqa_mod._LookupRecorder(qa.session.cache)
    with rec:
        qa.session.generate_ids  # noqa: B018 - nothing run: the hook alone must not count
    assert rec.log == [] and "lookup" not in vars(qa.session.cache.layers[0])
    checkpoint = qa.session.cache.checkpoint()
    before = qa.session.stats()["lookups"]
    with docqa_mod._LookupRecorder(qa.session.cache) as rec:
        list(qa.session.generate_ids("\n\nQuestion: What color is box 7?\nAnswer:", 2))
    qa.session.cache.rollback(checkpoint)
    assert len(rec.log) == qa.session.stats()["lookups"] - before > 0


def test_kv_evidence_keeps_groups_apart_where_layers_chose_other_units(tiny_llm):
    # With each layer's own lookup (selector "infllm") the layers choose apart: a group per layer where
    # their best units differ, merged only where they are the same.
    from dataclasses import replace

    from memllm.agents.docqa import default_memory

    memory = replace(default_memory(tiny_llm.trained_len), selector="infllm")
    qa = make(tiny_llm, "kv", memory=memory)
    qa.read(boxes_text(), name="boxes.txt")
    units = [e for e in qa.ask(QUESTIONS[0]).evidence if e.kind == "unit"]
    by_group: dict[str, list[int]] = {}
    for e in units:
        by_group.setdefault(e.group, []).append(e.start)
    assert set(by_group) == {"layers 0-0", "layers 1-1"} and by_group["layers 0-0"] != by_group["layers 1-1"]


def test_kv_evidence_lists_the_units_the_question_ranked_best_first(tiny_llm):
    # Every layer reads the units the question chose, so their lookup counts tie: the evidence shows them
    # in the order of the question's ranking (before: by unit id, the document's first units).
    qa = make(tiny_llm, "kv")
    qa.read(boxes_text(), name="boxes.txt")
    answer = qa.ask(QUESTIONS[0])
    sel = qa.session.last_selection
    assert sel is not None and sorted(sel["ranked_units"]) == sorted(sel["units"])
    cfg, seg_start, td = qa.memory, qa.segments[0][0], qa.docs[0]
    group = [e for e in answer.evidence if e.kind == "unit" and e.group == "layers 0-1"]
    shown = [(td.starts.index(e.start) + seg_start - cfg.n_init) // cfg.block_size for e in group]
    ranked = [u for u in sel["ranked_units"] if u in shown]
    assert shown and shown == ranked[: len(shown)]


def test_text_mode_evidence_chunks_and_budget(tiny_llm):
    qa = make(tiny_llm, "text")
    text = boxes_text()
    report = qa.read(text, name="boxes.txt")
    assert report.chunks == qa.chunk_count > 3
    prompts = []
    real = qa._complete
    qa._complete = lambda prompt, n: prompts.append(prompt) or real(prompt, n)
    answer = qa.ask("What color is box 7?")
    assert answer.evidence and all(e.kind == "chunk" for e in answer.evidence)
    scores = [e.score for e in answer.evidence]
    assert scores == sorted(scores, reverse=True)
    td = qa.docs[0]
    for ev in answer.evidence:
        assert ev.text == text[ev.start : ev.end] and ev.lines == td.doc.lines(ev.start, ev.end)
    assert "Box 7 is red." in answer.evidence[0].text
    ids = tiny_llm.tokenizer(prompts[0], add_special_tokens=False)["input_ids"]
    assert len(ids) + qa.max_new_tokens <= tiny_llm.trained_len
    assert prompts[0].endswith(docqa_mod.PROMPT_QUESTION.format(question="What color is box 7?"))
    # The best chunk sits nearest the question.
    assert prompts[0].rindex(answer.evidence[0].text) > prompts[0].rindex(answer.evidence[-1].text)
    qa.close()


def test_text_mode_puts_the_models_own_budget_of_chunks_before_the_question(tiny_llm, monkeypatch):
    """context_tokens defaults to the packaged model's text_tokens (SmolLM2-135M: 512, measured to answer more
    than 2,048), 2,048 for a model without an alias; a given value wins; a bad one is a ConfigError."""
    from dataclasses import replace

    from memllm import models

    assert models.ALIASES["smollm2-135m"].text_tokens == 512
    assert tiny_llm.name not in models.ALIASES and make(tiny_llm, "text").context_tokens == 2048
    spec = replace(models.ALIASES["smollm2-135m"], alias=tiny_llm.name, text_tokens=40)
    monkeypatch.setitem(models.ALIASES, tiny_llm.name, spec)
    text = boxes_text()
    chosen = {}
    for name, kw in (("model's", {}), ("given", {"context_tokens": 2048})):
        qa = make(tiny_llm, "text", **kw)
        qa.read(text, name="boxes.txt")
        chosen[name] = qa.ask("What color is box 7?").evidence
        assert qa.context_tokens == (40 if name == "model's" else 2048)
        qa.close()
    assert 0 < sum(tiny_llm.count_tokens(e.text) for e in chosen["model's"]) <= 40
    assert len(chosen["model's"]) < len(chosen["given"])
    for bad in (0, -5, 1.5, True, "512"):
        with pytest.raises(ConfigError, match="context_tokens"):
            make(tiny_llm, "text", context_tokens=bad)


def test_hybrid_has_chunks_and_units_and_rolls_back(tiny_llm):
    qa = make(tiny_llm, "hybrid", hybrid_tokens=64)
    qa.read(boxes_text(), name="boxes.txt")
    before = memory_state(qa)
    a = qa.ask("What color is box 7?")
    b = qa.ask("What color is box 7?")
    after = memory_state(qa)
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])
    assert a.text == b.text
    kinds = {e.kind for e in a.evidence}
    assert kinds == {"chunk", "unit"}
    used = sum(tiny_llm.count_tokens(e.text) for e in a.evidence if e.kind == "chunk")
    assert used <= 64
    qa.close()


def test_several_documents_map_to_their_sources(tiny_llm):
    qa = make(tiny_llm, "kv")
    one, two = boxes_text(12), "\n\n".join(f"Cup {i} holds {i} spoons." for i in range(40))
    qa.read(one, name="one.txt")
    qa.read(two, name="two.txt")
    assert [s for _, s in qa.segments] == [0, 1]
    texts = {"one.txt": one, "two.txt": two}
    answer = qa.ask("How many spoons does cup 30 hold?")
    assert {e.source for e in answer.evidence} <= {"one.txt", "two.txt"}
    for ev in answer.evidence:
        assert ev.text == texts[ev.source][ev.start : ev.end]


def test_full_mode_truncates_the_middle(tiny_llm):
    qa = make(tiny_llm, "full")
    qa.read(boxes_text(), name="boxes.txt")
    answer = qa.ask("What color is box 7?")
    assert answer.evidence == []
    n = len(qa.docs[0].ids)
    room = (
        tiny_llm.trained_len
        - qa.max_new_tokens
        - tiny_llm.count_tokens(docqa_mod.PROMPT_QUESTION.format(question="What color is box 7?"))
    )
    assert answer.notes == [f"documents truncated: {n} tokens, the middle {n - room} cut"]


def save_boxes(llm, mode: str, path) -> tuple[DocumentQA, list[dict]]:
    """Read the boxes, answer QUESTIONS, save to `path` and close: the (closed) reader and its answers."""
    qa = make(llm, mode)
    qa.read(boxes_text(), name="boxes.txt")
    answers = [qa.ask(q).to_dict() for q in QUESTIONS]
    qa.save(path)
    qa.close()
    return qa, answers


def load(llm, path) -> DocumentQA:
    return DocumentQA.load(llm, path, embedder=FakeEmbedder())


def assert_same_answers(answers: list[dict], qa: DocumentQA) -> list[dict]:
    """`qa` answers QUESTIONS as `answers` did (all but the seconds); returns its answers."""
    again = [qa.ask(q).to_dict() for q in QUESTIONS]
    for a, b in zip(answers, again, strict=True):
        assert {**a, "seconds": 0} == {**b, "seconds": 0}
    return again


@pytest.mark.parametrize("mode", ["kv", "text", "hybrid"])
def test_save_and_load_answer_the_same(tiny_llm, tmp_path, mode):
    _, answers = save_boxes(tiny_llm, mode, tmp_path / "mem")
    restored = load(tiny_llm, tmp_path / "mem")
    assert restored.mode == mode
    assert_same_answers(answers, restored)
    restored.close()


def test_chunk_spans_cover_the_text_within_budget(tiny_llm):
    text = boxes_text(10) + "\n\n" + " ".join(f"word{i}." for i in range(120)) + "\n\nTail."
    td = TokenizedDocument.build(read_text(text, "t.txt"), tiny_llm.tokenizer)
    spans = chunk_spans(td, 40)
    assert all(a < b for a, b in spans) and all(s[1] <= t[0] for s, t in zip(spans, spans[1:], strict=False))
    assert all(td.tokens_in(a, b) <= 40 for a, b in spans)
    covered = "".join(text[a:b] for a, b in spans)
    assert "".join(covered.split()) == "".join(text.split())


def test_chunks_end_at_a_sentence_then_a_line_then_a_word(tiny_llm):
    """A paragraph too long for a chunk is cut at a sentence's end where one is past the piece's middle, so a
    sentence and its value stay in one chunk (a cut at any word end split "... project is " from its code);
    with no sentence end, at a line's end; with neither, at a word's end."""
    import re

    def chunks(text):
        td = TokenizedDocument.build(read_text(text, "t.txt"), tiny_llm.tokenizer)
        spans = chunk_spans(td, 40)
        assert all(td.tokens_in(a, b) <= 40 for a, b in spans) and len(spans) > 2
        return [text[a:b] for a, b in spans]

    words = " ".join(f"The code of project {i} is {i * 7919}." for i in range(40)).split(" ")
    wrapped = "\n".join(" ".join(words[i : i + 5]) for i in range(0, len(words), 5))  # lines cut mid-sentence
    cut = chunks(wrapped)
    assert all(c.rstrip().endswith(".") for c in cut)
    for i in range(40):  # every sentence whole in one chunk
        assert sum(re.sub(r"\s+", " ", c).count(f"project {i} is {i * 7919}.") for c in cut) == 1
    lines = "\n".join(f"line {i} of a log with no full stop" for i in range(60))
    assert all(c.endswith("full stop\n") for c in chunks(lines)[:-1])
    flat = " ".join(f"w{i}" for i in range(300))
    assert all(re.fullmatch(r"(w\d+ )+", c) for c in chunks(flat)[:-1])


def test_host_memory_refusal(tiny_llm, monkeypatch):
    from memllm import limits

    budget = limits.MemoryBudget(1024, 8 * 1024**3, "container memory limit (cgroup v1)")
    monkeypatch.setattr(limits, "memory_budget", lambda: budget)
    qa = make(tiny_llm, "kv")
    text = boxes_text()
    n = len(tiny_llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    per = 2 * 2 * 2 * 16 * 2  # layers * (K, V) * kv_heads * head_dim * bf16 bytes
    with pytest.raises(MemoryLimitError) as info:
        qa.read(text, name="boxes.txt")
    need = len(text) * limits.READ_BYTES_PER_BYTE + n * per
    assert str(info.value) == (
        f"reading boxes.txt into context memory (about {n:,} tokens at {per:,} bytes per token) needs about "
        f"{limits.human_bytes(need)} (and 256.0 MiB kept free for the interpreter and the system), but only 1.0 KiB is free under the container memory limit (cgroup v1) "
        "of 8.00 GiB: use --mode text, a smaller document, or int8 offload"
    )
    assert info.value.exit_code == 8


def test_errors(tiny_llm, tmp_path):
    with pytest.raises(ConfigError, match="mode must be one of kv, text, hybrid, full"):
        DocumentQA(tiny_llm, "vector")
    qa = make(tiny_llm, "full")
    with pytest.raises(InputError, match="nothing has been read yet"):
        qa.ask("anything?")
    qa.read("some text", name="t.txt")
    with pytest.raises(InputError, match="a question must be non-empty"):
        qa.ask("   ")
    with pytest.raises(SnapshotError, match="no document memory at"):
        DocumentQA.load(tiny_llm, tmp_path)


@pytest.mark.parametrize("mode", ["text", "hybrid"])
def test_memory_saved_from_a_loaded_memory_is_self_contained(tiny_llm, tmp_path, mode):
    """--memory A --save-memory B: B holds the chunk store too, so B answers after A is deleted."""
    qa, answers = save_boxes(tiny_llm, mode, tmp_path / "a")
    loaded = load(tiny_llm, tmp_path / "a")
    loaded.save(tmp_path / "b")
    loaded.close()
    shutil.rmtree(tmp_path / "a")
    b = load(tiny_llm, tmp_path / "b")
    assert b.mode == mode and b.store.count(b.namespace) == b.chunk_count == qa.chunk_count > 3
    again = assert_same_answers(answers, b)
    assert all(any(e["kind"] == "chunk" for e in a["evidence"]) for a in again)
    b.close()


def test_reading_more_into_a_loaded_memory_leaves_the_saved_one_as_it_was(tiny_llm, tmp_path):
    qa, _ = save_boxes(tiny_llm, "text", tmp_path / "a")
    loaded = load(tiny_llm, tmp_path / "a")
    loaded.read("\n\n".join(f"Cup {i} holds {i} spoons." for i in range(40)), name="cups.txt")
    loaded.save(tmp_path / "b")
    loaded.close()
    a, b = load(tiny_llm, tmp_path / "a"), load(tiny_llm, tmp_path / "b")
    assert a.store.count(a.namespace) == a.chunk_count == qa.chunk_count
    assert b.store.count(b.namespace) == b.chunk_count > qa.chunk_count
    assert {e.source for e in a.ask("How many spoons does cup 30 hold?").evidence} == {"boxes.txt"}
    assert "cups.txt" in {e.source for e in b.ask("How many spoons does cup 30 hold?").evidence}
    a.close(), b.close()


def test_text_memory_without_its_chunk_store_is_refused(tiny_llm, tmp_path):
    save_boxes(tiny_llm, "text", tmp_path / "a")
    shutil.rmtree(tmp_path / "a" / "store")
    with pytest.raises(SnapshotError) as info:
        load(tiny_llm, tmp_path / "a")
    assert str(info.value) == (
        f"document memory at {tmp_path / 'a'} has no chunk store (store/): save it again with --save-memory"
    )


@pytest.mark.parametrize("selector", ["hybrid", "lexical"])
def test_kv_with_a_text_selector_reads_a_text_index_over_the_units(tiny_llm, selector):
    from dataclasses import replace

    from memllm.agents.docqa import default_memory

    memory = replace(default_memory(tiny_llm.trained_len), selector=selector)
    qa = make(tiny_llm, "kv", memory=memory)
    qa.read(boxes_text(), name="boxes.txt")
    index = qa.session.text_index
    assert index is not None and len(index.ids) == qa.session.stats()["tokens_seen"]
    before = memory_state(qa)
    first = qa.ask(QUESTIONS[0])
    sel = qa.session.last_selection
    assert sel is not None and sel["text_score"] is not None and index.embedded == index.windows_for(len(sel["text_score"]))
    assert (sel["lexical_score"] is not None) == (selector != "hybrid")
    assert len(sel["units"]) == qa.memory.topk
    assert sel["query"] == QUESTIONS[0]  # the user's words, not the prompt's instructions and example
    again = qa.ask(QUESTIONS[0])
    after = memory_state(qa)
    assert before[:2] == after[:2] and torch.equal(before[2], after[2]) and first.text == again.text


def _keys_document(n: int = 60) -> tuple[str, list[str]]:
    """Short paragraphs naming other keys with the question's words (close to it in bag-of-words cosine) and two
    long ones, each holding one asked key among other words: (text, the two asked key sentences)."""
    nouns = ["heron", "badger", "lantern", "harbor", "meadow", "comet", "willow", "anvil", "sparrow", "quarry"]
    paras = [f"What are the secret codes of the crimson-{nouns[i % 10]}{i} project and the silver-{nouns[(i + 3) % 10]}{i} "
             f"project? {1000 + i} and {2000 + i}." for i in range(n)]  # fmt: skip
    filler = " ".join(f"Farmers{j} carried barrels{j} along roads{j} near rivers{j}." for j in range(3))
    asked = ["The secret code of the crimson-falcon project is 4417.", "The secret code of the silver-otter project is 9023."]
    paras.insert(n // 3, f"{filler} {asked[0]} {filler}")
    paras.insert(2 * n // 3, f"{filler} {asked[1]} {filler}")
    return "\n\n".join(paras), asked


def test_text_retrieval_puts_the_chunks_holding_the_questions_rare_words_first(tiny_llm):
    """Text mode's default retrieval (`lexical`): the chunks holding the question's rare words (its keys) come
    first and nearest the question, both keys of a question about two (cover_words), before MiniLM's (here the
    fake embedder's) ranking; `dense`, that ranking alone, is the baseline benchmarks compare with."""
    text, asked = _keys_document()
    question = "What are the secret codes of the crimson-falcon project and the silver-otter project?"
    qa = make(tiny_llm, "text", chunk_tokens=64)  # the tiny model's window leaves no room: a budget of 600 tokens
    assert qa.retrieval == "lexical"
    qa.read(text, name="keys.txt")
    evidence, joined = qa._retrieve(question, 600)
    assert all(a in " ".join(e.text for e in evidence[:2]) for a in asked)
    assert sum(qa.llm.count_tokens(e.text + "\n") for e in evidence) <= 600 and len(evidence) > 2
    assert joined.endswith(evidence[0].text)  # the best chunk nearest the question
    # every chunk shows the embedder's cosine with the question, those MiniLM's candidates did not hold too
    vectors = qa.store.embedder.embed([question, *(e.text for e in evidence)])
    assert [e.score for e in evidence] == pytest.approx((vectors[1:] @ vectors[0]).tolist(), abs=1e-5)
    assert all(e.score > 0 for e in evidence[:2])
    qa.close()
    dense = make(tiny_llm, "text", chunk_tokens=64, retrieval="dense")
    dense.read(text, name="keys.txt")
    ranked = [e.score for e in dense._retrieve(question, 600)[0]]
    assert len(ranked) > 2 and ranked == sorted(ranked, reverse=True)  # the embedder's ranking, best first
    dense.close()
    with pytest.raises(ConfigError, match="retrieval"):
        make(tiny_llm, "text", retrieval="bm25")


def test_cover_words_adds_a_chunk_for_words_the_lead_lacks_only_where_they_weigh():
    from memllm.agents.docqa import cover_words

    # words: key A (2 words), key B (2 words), "year" (a common question word in few chunks of a small document)
    held = torch.zeros(20, 5, dtype=torch.bool)
    held[3, 0:2] = True  # the chunk with key A
    held[11, 2:4] = True  # the chunk with key B
    held[[5, 6, 7], 4] = True  # "year"
    held[12, 2] = True  # half of key B
    assert cover_words([3], held, cap=4) == [3, 11]  # key B weighs as much as A: covered; "year" does not
    assert cover_words([3], held, cap=4, share=0.0) == [3, 11, 5]  # every word, however little it weighs
    assert cover_words([3], held, cap=1) == [3]  # no room
    assert cover_words([3, 11], held, cap=4) == [3, 11]
