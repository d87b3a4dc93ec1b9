"""Registered ops of reasonrl (ops.md): public functional entry points with implementation dispatch."""

from reasonrl.ops.token_logprobs import TokenLogprobs, set_validation, token_logprobs, validation_enabled

__all__ = ["TokenLogprobs", "token_logprobs", "set_validation", "validation_enabled"]
