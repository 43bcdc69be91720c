"""The tiny random Llama of the document QA tests (its GGUF path and the model loaded once)."""

from tests.docqa.conftest import tiny_llm, tiny_path  # noqa: F401
