"""Registered ops of reasonrl (ops.md): public functional entry points with implementation dispatch."""

from reasonrl.ops.token_logprobs import TokenLogprobs, set_validation, token_logprobs, validation_enabled

__all__ = ["TokenLogprobs", "token_logprobs", "set_validation", "validation_enabled"]
from reasonrl.ops.group_advantages import Advantages, advantage_preset, group_advantages  # noqa: E402

__all__ += ["Advantages", "group_advantages", "advantage_preset"]
from reasonrl.ops.linear_token_logprobs import linear_token_logprobs  # noqa: E402

__all__ += ["linear_token_logprobs"]
