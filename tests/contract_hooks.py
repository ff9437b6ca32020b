"""schemathesis hooks for test_openapi_contract: the one place where a schema-valid request may be refused.

Some refusals depend on what no JSON Schema can state: the prompt's length in the model's tokens, whether
llguidance can enforce a tool's parameter schema, whether a named tool_choice is among the tools, whether a tool
call's `arguments` in the history is JSON, whether an uploaded adapter file holds what its name says, whether
max_tokens leaves room for the shortest answer a schema allows. Those 400s are right (the real service refuses
such prompts too) and each is recognised here by its own wording; any other 400 to a request the document calls
valid still fails the run.
"""

from __future__ import annotations

import schemathesis
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

SEMANTIC_REFUSALS = (
    "but the context window holds",  # the prompt, in tokens, is longer than the model's window
    "cannot be enforced",  # a tool's or JSON mode's schema that llguidance cannot compile
    "which is not among the tools",  # tool_choice names a function the request does not offer
    "a tool call in the conversation is malformed",  # `arguments` in the history that is not JSON
    "raise max_tokens to at least",  # the shortest answer the schema allows does not fit max_tokens
    "only supports single tool-calls",  # Llama 3.1's template refuses a history turn with two tool calls
    "there's no first user message",  # Llama 3.1's template puts tools in the first user turn and needs one
    "adapter_config.json",  # an uploaded config that is not a PEFT LoRA config
    "adapter_model.safetensors",  # uploaded weights that are not LoRA safetensors of this model's shape
)


@schemathesis.check
def valid_data_accepted_unless_semantic(ctx, response, case) -> bool | None:  # type: ignore[no-untyped-def]
    """schemathesis's positive_data_acceptance, but for the refusals above."""
    if response.status_code == 400 and any(phrase in response.text for phrase in SEMANTIC_REFUSALS):
        return None
    return positive_data_acceptance(ctx, response, case)


@schemathesis.check
def invalid_data_rejected_or_too_large(ctx, response, case) -> bool | None:  # type: ignore[no-untyped-def]
    """schemathesis's negative_data_rejection, with 413 a refusal too: a body over --max-body-bytes (a string past
    its maxLength, say) is refused by its size before its content is read, the documented 413 (code 3006)."""
    if response.status_code == 413:
        return None
    return negative_data_rejection(ctx, response, case)
