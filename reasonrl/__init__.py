"""reasonrl: fused kernels for RL fine-tuning of LLM reasoning.

``import reasonrl`` needs neither triton nor the compiled extension, never initialises CUDA and never
changes global torch._dynamo / torch._inductor configuration. The extension is loaded on the first op call
(or by ``reasonrl info``).
"""

from reasonrl.ops import (
    TokenLogprobs,
    linear_token_logprobs,
    saved_logits_bytes_default,
    set_saved_logits_bytes,
    set_validation,
    token_logprobs,
    validation_enabled,
)

__version__ = "0.1.0"

__all__ = [
    "TokenLogprobs",
    "token_logprobs",
    "linear_token_logprobs",
    "set_saved_logits_bytes",
    "saved_logits_bytes_default",
    "set_validation",
    "validation_enabled",
    "__version__",
]
