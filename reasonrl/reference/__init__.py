"""Plain-PyTorch reference implementations: THE oracle of every op (tests, benchmarks, docs, fallbacks)."""

from reasonrl.reference.token_logprobs import TokenLogprobs, token_logprobs_reference

__all__ = ["TokenLogprobs", "token_logprobs_reference"]
from reasonrl.reference.group_advantages import Advantages, group_advantages_reference  # noqa: E402

__all__ += ["Advantages", "group_advantages_reference"]
from reasonrl.reference.linear_token_logprobs import linear_token_logprobs_reference  # noqa: E402

__all__ += ["linear_token_logprobs_reference"]
