"""Registered ops of reasonrl (docs/ops.md): public functional entry points with implementation dispatch.

What every op shares (implementation choice, lazy registration, validation, the row view) is in
``reasonrl._backend``; docs/adding-an-op.md is the recipe for a new op.
"""

from reasonrl._backend import set_validation, validation_enabled
from reasonrl.ops.group_advantages import Advantages, advantage_preset, group_advantages
from reasonrl.ops.linear_token_logprobs import (
    linear_token_logprobs,
    saved_logits_bytes_default,
    set_saved_logits_bytes,
)
from reasonrl.ops.token_logprobs import TokenLogprobs, token_logprobs

__all__ = [
    "TokenLogprobs",
    "token_logprobs",
    "set_validation",
    "validation_enabled",
    "Advantages",
    "group_advantages",
    "advantage_preset",
    "linear_token_logprobs",
    "set_saved_logits_bytes",
    "saved_logits_bytes_default",
]
