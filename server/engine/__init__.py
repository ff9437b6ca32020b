"""Text generation on a llama.cpp model, behind a small async interface that knows nothing of HTTP."""

from .chat_template import ChatTemplateError
from .engine import (
    BudgetTooSmall,
    Busy,
    ChatPrompt,
    CompletionRequest,
    Engine,
    EngineNotReady,
    EngineState,
    Prompt,
    PromptEmpty,
    PromptTooLarge,
    PromptTooLong,
    QueueFull,
    TextPrompt,
)
from .generation import FinishReason, Generation, GenerationFailed, Usage
from .grammar import Grammar, GrammarError
from .llama_model import ContextSettings
from .sampler import SamplingParams

__all__ = [
    "BudgetTooSmall",
    "Busy",
    "ChatPrompt",
    "ChatTemplateError",
    "CompletionRequest",
    "ContextSettings",
    "Engine",
    "EngineNotReady",
    "EngineState",
    "FinishReason",
    "Generation",
    "GenerationFailed",
    "Grammar",
    "GrammarError",
    "Prompt",
    "PromptEmpty",
    "PromptTooLarge",
    "PromptTooLong",
    "QueueFull",
    "SamplingParams",
    "TextPrompt",
    "Usage",
]
