"""The fused loss kernels' interface table (reasonrl/ops/policy_loss.py) is the one source of truth.

(a) csrc/cpu/policy_loss.cpp (enums LossKind, KlKind, Param, Column, kInputs) and kernels/policy_loss.py (its
    tl.constexpr constants and PARAMS) restate it exactly, read from the source text (no compiler, no triton).
(b) Every loss type of the config is in the table (a kernel kind, or the reason the single pass cannot serve
    it), every kernel kind has a branch in both kernels, and the Triton branches name the constants.
(c) A loss kind the table lists without a kernel branch, or a loss type missing from it, takes the two-phase
    path with a reason (never a KeyError), and the loss equals the reference's.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from reasonrl import loss_config
from reasonrl.losses import LossNormalizers, PolicyLossConfig, policy_loss, policy_loss_from_logits
from reasonrl.losses.fused import single_pass_blocker
from reasonrl.ops import policy_loss as table
from reasonrl.reference.token_logprobs import token_logprobs_reference

ROOT = Path(__file__).resolve().parents[2]
CPP = (ROOT / "csrc" / "cpu" / "policy_loss.cpp").read_text()
TRITON = (ROOT / "kernels" / "policy_loss.py").read_text()


def _snake(camel: str) -> str:
    """kCispoTwoSided -> cispo_two_sided, kK1 -> k1, kLowVarKl -> low_var_kl."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _cpp_enum(name: str) -> dict[str, int]:
    """{snake name: value} of ``enum <name> : int64_t { ... }`` (implicit values count up as in C++)."""
    match = re.search(rf"enum {name} : int64_t \{{(.*?)\}};", CPP, re.S)
    assert match, f"enum {name} not found in csrc/cpu/policy_loss.cpp"
    body = re.sub(r"//[^\n]*", "", match.group(1))
    out, value = {}, -1
    for item in (i.strip() for i in body.split(",")):
        if not item:
            continue
        ident, _, explicit = (p.strip() for p in item.partition("="))
        value = int(explicit) if explicit else value + 1
        out[_snake(ident[1:])] = value
    return out


def _triton_constants() -> dict[str, object]:
    """Module-level ``NAME = tl.constexpr(<int>)``, ``NAME = <int>`` and ``PARAMS = (...)`` of the kernel."""
    out = {}
    for node in ast.parse(TRITON).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)):
            continue
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "attr", None) == "constexpr":
            value = value.args[0]
        try:
            out[node.targets[0].id] = ast.literal_eval(value)
        except ValueError:
            continue
    return out


# ----------------------------------------------------------------------------------------------------------
# (a) the C++ and Triton constants restate the table
# ----------------------------------------------------------------------------------------------------------


def test_cpp_constants_match_the_table():
    assert _cpp_enum("LossKind") == table.LOSS_KINDS
    kl = _cpp_enum("KlKind")
    assert kl.pop("straight_through") == table.KL_STRAIGHT_THROUGH
    assert kl == table.KL_KINDS
    params = _cpp_enum("Param")
    assert params.pop("num_params") == len(table.PARAMS)
    assert list(params) == list(table.PARAMS) and list(params.values()) == list(range(len(table.PARAMS)))
    columns = _cpp_enum("Column")
    assert list(columns) == list(table.INPUT_COLUMNS) and list(columns.values()) == list(range(len(columns)))
    assert int(re.search(r"constexpr int64_t kInputs = (\d+);", CPP).group(1)) == len(table.INPUT_COLUMNS)


def test_triton_constants_match_the_table():
    consts = _triton_constants()

    def group(prefix: str) -> dict[str, int]:
        return {k[len(prefix):].lower(): v for k, v in consts.items()
                if k.startswith(prefix) and k != "KL_STRAIGHT_THROUGH"}

    assert group("LOSS_") == table.LOSS_KINDS
    assert group("KL_") == table.KL_KINDS
    assert consts["KL_STRAIGHT_THROUGH"] == table.KL_STRAIGHT_THROUGH
    assert group("COL_") == {name: i for i, name in enumerate(table.INPUT_COLUMNS)}
    assert consts["NUM_INPUTS"] == len(table.INPUT_COLUMNS)
    assert consts["PARAMS"] == table.PARAMS


# ----------------------------------------------------------------------------------------------------------
# (b) completeness: a new loss type or kind fails here until the config, the table and both kernels have it
# ----------------------------------------------------------------------------------------------------------


def test_every_loss_type_is_in_the_table():
    assert set(table.LOSS_TYPE_KINDS) == set(loss_config.LOSS_TYPES)
    for loss_type, entry in table.LOSS_TYPE_KINDS.items():
        if isinstance(entry, tuple):
            kind, why = entry
            assert kind is None and why, loss_type
        elif isinstance(entry, str):
            assert entry in table.LOSS_KINDS, loss_type
    assert {table.kernel_loss_kind(PolicyLossConfig(loss_type="cispo", cispo_mode=m))[0]
            for m in loss_config.CISPO_MODES} == {"cispo_upper", "cispo_two_sided"}


@pytest.mark.parametrize("kind", list(table.LOSS_KINDS))
def test_every_kernel_kind_has_a_branch_in_both_kernels(kind):
    camel = "".join(part.capitalize() for part in kind.split("_"))
    assert re.search(rf"case k{camel}\b|default:\s*//\s*k{camel}\b", CPP), f"no C++ branch for {kind}"
    upper = kind.upper()
    triton_branch = rf"LOSS_KIND == LOSS_{upper}\b|else:\s*#\s*LOSS_{upper}\b"
    assert re.search(triton_branch, TRITON), f"no Triton branch for {kind}"


def test_triton_branches_name_their_constants():
    assert not re.search(r"(LOSS_KIND|KL_BASE) [!=]= \d", TRITON)
    assert not re.search(r"inputs_ptr \+ row \* \d|\b(inp|row) \+ \d\b", TRITON)


# ----------------------------------------------------------------------------------------------------------
# (c) a kind without a kernel branch takes the two-phase path with a reason
# ----------------------------------------------------------------------------------------------------------


def _case():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, 29, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 29, (3, 4), generator=g)
    noise = 0.1 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    old = token_logprobs_reference(logits, labels).logprobs + noise
    advantages = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    return logits, labels, dict(advantages=advantages, old_logprobs=old)


def _two_phase_equals_reference(cfg, available_impls):
    if "cpp" not in available_impls:
        pytest.skip("the compiled extension is not available")
    logits, labels, kw = _case()
    x = logits.clone().requires_grad_(True)
    out = policy_loss_from_logits(x, labels, normalizers=LossNormalizers(), config=cfg, impl="cpp", **kw)
    assert type(out.loss.grad_fn).__name__ != "_PrecomputedGradientBackward", "took the single pass"
    out.loss.backward()
    y = logits.clone().requires_grad_(True)
    tl = token_logprobs_reference(y, labels, want_entropy=True)
    ref = policy_loss(tl.logprobs, entropies=tl.entropy, normalizers=LossNormalizers(), config=cfg, **kw)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-13)


def test_kind_without_a_kernel_branch_takes_the_two_phase_path(monkeypatch, available_impls):
    monkeypatch.setitem(table.LOSS_TYPE_KINDS, "reinforce", "reinforce_v2")  # a kind no kernel has
    cfg = PolicyLossConfig(loss_type="reinforce")
    why = single_pass_blocker(cfg)
    assert why is not None and "'reinforce_v2'" in why and "no branch" in why
    with pytest.raises(ValueError, match="reinforce_v2"):
        table.kernel_codes(cfg, has_old=True)
    _two_phase_equals_reference(cfg, available_impls)


def test_loss_type_missing_from_the_table_takes_the_two_phase_path(monkeypatch, available_impls):
    monkeypatch.delitem(table.LOSS_TYPE_KINDS, "sapo")  # a loss type the config knows, the table does not
    cfg = PolicyLossConfig(loss_type="sapo", entropy_coef=0.01)
    why = single_pass_blocker(cfg)
    assert why is not None and "loss_type='sapo'" in why and "LOSS_TYPE_KINDS" in why
    _two_phase_equals_reference(cfg, available_impls)
