"""Plain-PyTorch reference implementations: THE oracle of every op (tests, benchmarks, docs, fallbacks)."""

from reasonrl.reference.token_logprobs import TokenLogprobs, token_logprobs_reference

__all__ = ["TokenLogprobs", "token_logprobs_reference"]
from reasonrl.reference.group_advantages import Advantages, group_advantages_reference  # noqa: E402

__all__ += ["Advantages", "group_advantages_reference"]
from reasonrl.reference.linear_token_logprobs import linear_token_logprobs_reference  # noqa: E402

__all__ += ["linear_token_logprobs_reference"]
from reasonrl.reference.r3_reward import R3Output, r3_reward_reference  # noqa: E402

__all__ += ["R3Output", "r3_reward_reference"]
from reasonrl.reference.phase_entropy import (  # noqa: E402
    PhaseEntropy,
    find_boundary_reference,
    phase_entropy_reference,
)

__all__ += ["PhaseEntropy", "phase_entropy_reference", "find_boundary_reference"]
