"""GPU tests of r3_reward (pytest -m gpu): the compiled Triton kernel on CUDA against the float64 reference,
and ``impl="auto"`` picking it. The interpreter tests (tests/ops/test_r3_reward.py) cover the semantics on
small shapes; these add the compiled code path and realistic sizes (K = 8, reference lengths up to 300, so
many 32-column blocks)."""

from __future__ import annotations

import math

import pytest
import torch

from reasonrl import _backend as backend
from reasonrl.ops.r3_reward import r3_reward
from reasonrl.reference.r3_reward import r3_reward_reference
from reasonrl.testing import assert_stat_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _case(seed, g=16, k=8, width=300):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand((g, k, width), generator=gen, dtype=torch.float64) * 5.0
    lengths = torch.randint(1, width + 1, (g,), generator=gen)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    roll = torch.rand((g, k), generator=gen) < 0.8
    roll[0] = False
    roll[0, 3] = True  # sigma = 0
    roll[1] = False  # no valid rollout
    base = -torch.rand((g, width), generator=gen, dtype=torch.float64)
    lp[~(roll[:, :, None] & mask[:, None, :])] = math.nan
    return lp, mask, roll, base


@pytest.mark.parametrize("weighting", ["linear", "softmax", "topk", "uniform"])
@pytest.mark.parametrize("gamma", [None, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_cuda_matches_reference(weighting, gamma, dtype):
    lp, mask, roll, base = _case(0)
    lp_in = lp.to(dtype)
    kw = dict(ref_mask=mask, rollout_mask=roll, baseline_logprobs=base.float(), weighting=weighting,
              propagation_gamma=gamma, topk=0.1, reduction="sum")
    oracle = r3_reward_reference(lp_in.double(), **kw)
    ref32 = r3_reward_reference(lp_in, **kw)
    cuda_kw = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    out = r3_reward(lp_in.cuda(), impl="triton", **cuda_kw)
    assert torch.equal(out.num_valid_rollouts.cpu(), oracle.num_valid_rollouts)
    for field in ("reward", "weights", "sigma"):
        assert_stat_close(getattr(out, field).cpu().double(), getattr(oracle, field),
                          getattr(ref32, field).double(), dtype=dtype, name=f"cuda {weighting} {field}")


def test_auto_picks_triton_on_cuda(monkeypatch):
    monkeypatch.delenv("REASONRL_IMPL", raising=False)
    assert backend.resolve_impl("r3_reward", "auto", torch.device("cuda"), torch.float32) == "triton"
