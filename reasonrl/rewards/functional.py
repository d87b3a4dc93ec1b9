"""Public functional entry points of the reward tensor ops: ``r3_reward``, ``phase_entropy``,
``find_boundary`` (docs/ops.md sections 5 and 6).

Each is the registered op itself (``reasonrl/ops/r3_reward.py``, ``reasonrl/ops/phase_entropy.py``):
``impl="auto"`` takes the C++ kernel on CPU tensors and the Triton kernel on CUDA tensors, falling back to the
plain-PyTorch reference (``reasonrl/reference/``, the oracle); ``"cpp"`` / ``"triton"`` / ``"reference"``
choose explicitly, and an explicit choice that cannot run raises ``RuntimeError`` (docs/ops.md section 7:
never a silent fallback). The ops are O(G K L) (R3) and O(N) (phase entropy) work after the model's forward
pass, which dominates the reward's cost; the fused versions mainly save kernel launches and the
reference's temporaries ([G, K, L] for R3, several [N] index and masked-copy tensors for phase entropy).
"""

from __future__ import annotations

# The registered ops themselves (C++ on CPU, Triton on CUDA, the reference as fallback).
from reasonrl.ops.phase_entropy import PhaseEntropy, find_boundary, phase_entropy
from reasonrl.ops.r3_reward import r3_reward
from reasonrl.reference.r3_reward import R3Output

__all__ = ["r3_reward", "phase_entropy", "find_boundary", "R3Output", "PhaseEntropy"]
