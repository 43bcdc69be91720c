"""langchain-tests standard suites for ChatMemLLM, on the tiny random-weight Llama (fast tier).

What the suites skip, and why (set through the suites' documented properties):
- tool calling, tool choice, structured output, JSON mode (`has_tool_calling`, `has_structured_output`,
  `supports_json_mode` keep their defaults, False): ChatMemLLM does not implement `bind_tools` or
  `with_structured_output`; memllm's default model (SmolLM2-135M) cannot call tools reliably, and
  the tiny test model emits random bytes.
- image, audio, video, PDF and Anthropic-format inputs (`supports_*` defaults, False): the models
  memllm runs read text only; non-text content blocks raise InputError.
- `test_stream_time` (`enable_vcr_tests` default, False): it benchmarks HTTP replays (VCR
  cassettes); ChatMemLLM makes no HTTP calls.
- `test_init_from_env` (`init_from_env_params` default, empty): ChatMemLLM reads no environment
  variables (no API key).
- `test_serdes`: ChatMemLLM is not LangChain-serialisable (it may hold a loaded model object).
Everything else runs and passes, including per-call `model=` overrides (a second tiny model).
"""

from __future__ import annotations

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from memllm.agents.langchain import ChatMemLLM
from tests.langchain.conftest import TINY


class TinyModelParams:
    """Both suites: ChatMemLLM on the session's tiny model (loaded once, see conftest)."""

    @property
    def chat_model_class(self) -> type[ChatMemLLM]:
        return ChatMemLLM

    @property
    def chat_model_params(self) -> dict:
        return {"model": TINY["path"], "device": "cpu"}


class TestChatMemLLMUnit(TinyModelParams, ChatModelUnitTests):
    pass


class TestChatMemLLMIntegration(TinyModelParams, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        # The suite asks for 100 new tokens; 16 keep it fast and still give non-empty replies.
        return {**super().chat_model_params, "max_tokens": 16}

    @property
    def model_override_value(self) -> str:
        return TINY["other"]
