"""The tiny random Llama of the document QA tests (its GGUF path and the model loaded once) and their
CLI fixture (the tiny model, the fake embedder, a fake clock)."""

from tests.docqa.conftest import cli, tiny_llm, tiny_path  # noqa: F401
