"""An LCEL chain with memory beyond its window: prompt | ChatMemLLM, with a persistent chat history
and memllm's memory retriever, on the default model (SmolLM2-135M), fully offline.

    python examples/agent_with_memory.py                  # a fresh, temporary memory
    python examples/agent_with_memory.py --store ./mem    # memory that survives between runs

The prompt shows the model only the last exchange of the conversation; anything older reaches it
through the retriever (memllm's controller: relevance, recency, importance, a token budget). The
first turn tells it a fact, an unrelated turn follows, and the last question needs the fact.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from operator import itemgetter

from langchain_core.documents import Document
from langchain_core.messages import HumanMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from memllm.agents.langchain import ChatMemLLM, MemllmChatMessageHistory, MemllmRetriever
from memllm.memory_stores import FaissStore, SentenceTransformerEmbedder

TURNS = [
    "Hi! My name is Ada and my dog is called Pixel.",
    "What is the capital of France?",
    "What is my dog called?",
]
SYSTEM = (
    "You are a helpful assistant. Answer in one short sentence.\n"
    "What you remember from earlier in this conversation:\n{memory}"
)


def format_memory(docs: list[Document]) -> str:
    return "\n".join(f"- {d.metadata.get('role', 'note')}: {d.page_content}" for d in docs) or "- nothing yet"


def build_chain(store: FaissStore, chat: ChatMemLLM, history: MemllmChatMessageHistory):
    """prompt | chat: the retriever fills {memory}; {history} is the last exchange of the history."""
    retriever = MemllmRetriever(store=store, user=history.session_id, llm=chat, k=3, memory_tokens=160)
    prompt = ChatPromptTemplate.from_messages(
        [("system", SYSTEM), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    return (
        RunnablePassthrough.assign(
            memory=itemgetter("question") | retriever | format_memory,
            history=RunnableLambda(lambda _: history.messages[-2:]),
        )
        | prompt
        | chat
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", help="memory store directory (default: a temporary one)")
    parser.add_argument("--model", default="smollm2-135m", help="alias, HF id, folder or .gguf")
    parser.add_argument("--user", default="ada")
    args = parser.parse_args(argv)
    path = args.store or tempfile.mkdtemp(prefix="memllm-example-")
    store = FaissStore(path, SentenceTransformerEmbedder())
    chat = ChatMemLLM(model=args.model, device="cpu", max_tokens=24)
    history = MemllmChatMessageHistory(args.user, store=store)
    chain = build_chain(store, chat, history)
    reply = ""
    try:
        for question in TURNS:
            print(f"you: {question}")
            answer = chain.invoke({"question": question})
            history.add_messages([HumanMessage(question), answer])  # stored: recallable from now on
            reply = answer.content.strip()
            print(f"assistant: {reply}\n")
    finally:
        store.close()
        if args.store is None:
            shutil.rmtree(path, ignore_errors=True)
    return reply


if __name__ == "__main__":
    main()
