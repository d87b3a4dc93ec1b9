"""Data-parallel training of :class:`reasonrl.trainer.Trainer` under torchrun (docs/trainer.md section 10).

:class:`DistContext` is everything the trainer does differently with more than one process:

* **process group**: initialised from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` / ``MASTER_PORT``), ``gloo`` on the CPU and ``nccl`` on CUDA (one GPU per rank:
  ``cuda:LOCAL_RANK``); a group the caller initialised already is used as it is.
* **rank share**: every rank takes the same ``prompts_per_step`` prompts from the pool and keeps a share of
  whole groups, so that advantages (over the K completions of a prompt) need no communication. The share is
  laid out per mini-batch: global mini-batch ``m`` is the union of every rank's local mini-batch ``m``
  (:func:`share_positions`), so a rank's optimiser steps see exactly the rows a single process's do.
* **rollout seeds**: each prompt is sampled from a seed of the step and of its position in the global batch
  (``SamplingParams.prompt_seeds``): a rank generates exactly the completions one process with
  ``rollout.seed_per_prompt=true`` generates for the same prompts.
* **global normalisers**: the loss tokens of each mini-batch are all-reduced once per step; the loss gets
  the global token and sequence counts and ``num_processes = world_size`` (docs/losses.md section 4), the
  convention under which the gradients are AVERAGED over the ranks.
* **gradients**: ``ddp`` all-reduces (SUM, then / world size) the accumulated gradients once per optimiser
  step, in flat buckets (:meth:`DistContext.reduce_gradients`), instead of wrapping the model in
  ``torch.nn.parallel.DistributedDataParallel``: the fused loss reads ``lm_head.weight`` outside the model's
  forward and the hidden states come from the decoder called directly, which DDP's reducer (armed by the
  wrapper's forward) does not see, and with gradient accumulation DDP would need ``no_sync()`` on every
  micro-batch but the last, leaving the same single all-reduce per optimiser step. What it would add is the
  overlap of that all-reduce with the last micro-batch's backward. ``fsdp2`` leaves the gradients to
  ``fully_shard`` (reduce-scatter, averaged), with ``set_requires_gradient_sync(False)`` on every micro-batch
  but the last.
* **metrics**: reduced over the ranks (:meth:`DistContext.reduce_metrics`), identical on every rank; rank 0
  alone writes the JSONL, TensorBoard, plots, summaries and checkpoints.

FSDP2 (``distributed.mode=fsdp2``): ``fully_shard`` on every decoder layer, then on the root (embeddings,
final norm, lm_head). The fused loss needs the whole ``[V, H]`` lm_head weight: the hidden states come from
the ROOT's forward (``output_hidden_states=True``, ``logits_to_keep=1``: one position's logits), after which
FSDP2 keeps the root's parameters gathered until the backward (it never reshards the root after forward),
so ``lm_head.weight`` is the full tensor when the loss reads it and its gradient is reduce-scattered with the
root's. Rewards that score with the policy model (R3) call its decoder outside any
forward and are refused under FSDP2 with a clear error.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch

__all__ = [
    "DistContext",
    "setup_distributed",
    "share_positions",
    "prompt_seed",
    "metric_weights",
    "MODEL_REWARDS",
]

# Rewards that run the policy model themselves (R3, docs/rewards.md section 2): not available under FSDP2.
MODEL_REWARDS = ("r3",)


def share_positions(num_prompts: int, world_size: int, rank: int, mini_batches: int) -> list[int]:
    """Positions in the step's global prompt list that ``rank`` generates, scores and trains on.

    The global batch is cut into ``mini_batches`` blocks of prompts (the single process's mini-batches, in
    whole groups) and every block into ``world_size`` equal runs: rank r holds run r of every block, so its
    local mini-batch m is its part of the global mini-batch m.

    Raises:
        ValueError: ``num_prompts`` is not a multiple of ``world_size x mini_batches`` (a group would straddle
            two ranks, or two ranks would hold different numbers of rows).
    """
    if num_prompts % (world_size * mini_batches) != 0:
        need = (
            f"world_size ({world_size})"
            if mini_batches == 1
            else f"world_size x optim.mini_batches ({world_size} x {mini_batches})"
        )
        raise ValueError(
            f"prompts_per_step ({num_prompts}) must be a multiple of {need} in a distributed run: every rank "
            "gets the same number of whole groups of every mini-batch"
        )
    block = num_prompts // mini_batches
    run = block // world_size
    return [m * block + rank * run + i for m in range(mini_batches) for i in range(run)]


def prompt_seed(step_seed: int, position: int) -> int:
    """The sampling seed of the prompt at ``position`` of a step's global batch (a 63-bit mix of both, so
    that neighbouring steps and positions get unrelated seeds)."""
    x = (step_seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from exc


def setup_distributed(cfg, device: str) -> DistContext:
    """The :class:`DistContext` of ``cfg.distributed`` (a TrainerConfig section) for a model on ``device``.

    ``mode=auto`` is ``ddp`` when torch.distributed is initialised or ``WORLD_SIZE`` > 1, else a single
    process. A process group that is already initialised (by the caller, e.g. a test) is used; otherwise it is
    initialised from the ``torchrun`` environment.
    """
    import torch.distributed as dist

    d = cfg.distributed
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else _env_world_size()
    mode = d.mode
    if mode == "auto":
        mode = "ddp" if (initialised or world > 1) else "off"
    if mode == "off":
        if world > 1:
            raise ValueError(
                f"distributed.mode=off, but WORLD_SIZE is {world}: every rank would train alone on the same "
                "prompts; use distributed.mode=auto (or ddp / fsdp2), or launch one process"
            )
        return DistContext(mode="off", device=torch.device(device))
    if not dist.is_available():
        raise RuntimeError(f"distributed.mode={mode} needs torch.distributed, which this torch build lacks")
    dev = torch.device(device)
    if not initialised:
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(
                    f"distributed.mode={mode}: the environment variable {var} is not set; launch with "
                    "torchrun (torchrun --nproc-per-node N -m reasonrl.cli train ...) or initialise "
                    "torch.distributed before building the Trainer"
                )
        backend = d.backend
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=d.timeout_s))
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", str(torch.cuda.current_device()))))
    ctx = DistContext(
        mode=mode,
        device=dev,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        bucket_bytes=int(d.bucket_mb * 2**20),
    )
    return ctx


@dataclass
class DistContext:
    """The process's place in the run. ``mode``: ``off`` (one process: every method is the identity), ``ddp``
    or ``fsdp2``. See the module docstring for what each part reduces."""

    mode: str = "off"
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1
    bucket_bytes: int = 25 * 2**20

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows the progress bar."""
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp2"

    # ------------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------------

    def check_config(self, cfg) -> None:
        """Errors for settings a distributed run cannot honour (before any model work)."""
        if not self.enabled:
            return
        share_positions(cfg.prompts_per_step, self.world_size, self.rank, cfg.optim.mini_batches)
        rows = cfg.prompts_per_step * cfg.rollout.group_size // (cfg.optim.mini_batches * self.world_size)
        mb = cfg.optim.micro_batch_size
        if mb and rows % mb != 0:
            raise ValueError(
                f"optim.micro_batch_size ({mb}) must divide each rank's share of a mini-batch "
                f"(prompts_per_step x group_size / (mini_batches x world_size) = {rows} sequences) in a "
                "distributed run"
            )
        if self.fsdp:
            used = [s.name for s in cfg.rewards if s.name in MODEL_REWARDS]
            if used:
                raise ValueError(
                    f"distributed.mode=fsdp2: the reward(s) {used} score with the policy model's decoder "
                    "outside its forward, which FSDP2 shards; use distributed.mode=ddp, or rewards that do "
                    "not run the model (numeric, the task verifier)"
                )
            if cfg.r3_filter.enabled:
                raise ValueError("distributed.mode=fsdp2: r3_filter scores with the policy model; use ddp")

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (a model initialised differently per rank would
        otherwise train apart under ``ddp``, or be sharded from mismatched copies under ``fsdp2``). Called
        before the reference model is copied from the policy and before ``fully_shard``."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``fsdp2``: ``fully_shard`` on each decoder layer, then on the root (in place; the model is
        returned). Otherwise nothing."""
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            from reasonrl.models import _decoder

            layers = getattr(_decoder(model), "layers", None)
            if layers is None:
                raise TypeError(
                    f"distributed.mode=fsdp2: {type(model).__name__}'s decoder has no .layers to shard "
                    "(Llama / Qwen2 style models are supported)"
                )
            for layer in layers:
                fully_shard(layer)
            fully_shard(model)
        return model

    # ------------------------------------------------------------------------------------------------------
    # The step's share and seeds
    # ------------------------------------------------------------------------------------------------------

    def positions(self, num_prompts: int, mini_batches: int) -> list[int]:
        """This rank's positions in the step's global prompt list (all of them in one process)."""
        if not self.enabled:
            return list(range(num_prompts))
        return share_positions(num_prompts, self.world_size, self.rank, mini_batches)

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of ``t`` (sum or max); the identity in one process."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    # ------------------------------------------------------------------------------------------------------
    # Model access under FSDP2
    # ------------------------------------------------------------------------------------------------------

    def hidden_states_and_lm_head(self, model, input_ids, attention_mask, **kwargs):
        """:func:`reasonrl.models.hidden_states_and_lm_head` (``kwargs``: more decoder inputs, e.g. a packed
        batch's position ids); under FSDP2 through the root's forward (which gathers the root's parameters,
        lm_head included, and keeps them gathered until the backward), with the logits of one position
        only."""
        from reasonrl.models import hidden_states_and_lm_head

        if not (self.fsdp and _is_fsdp(model)):  # the frozen reference model is never sharded
            return hidden_states_and_lm_head(model, input_ids, attention_mask, **kwargs)
        kwargs.setdefault("use_cache", False)
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            logits_to_keep=1,
            **kwargs,
        )
        head = model.get_output_embeddings()
        # hidden_states[-1] is the decoder's output after the final norm (what lm_head multiplies).
        return out.hidden_states[-1], head.weight, getattr(head, "bias", None)

    def set_gradient_sync(self, model, sync: bool) -> None:
        """FSDP2: reduce-scatter the gradients only on the last micro-batch of an optimiser step."""
        if self.fsdp:
            model.set_requires_gradient_sync(sync)

    def generate_kwargs(self) -> dict:
        """Extra ``generate`` arguments: FSDP2 forwards are collectives (ranks step until all have ended)."""
        return {"synced_gpus": True} if self.fsdp else {}

    # ------------------------------------------------------------------------------------------------------
    # Gradients
    # ------------------------------------------------------------------------------------------------------

    def reduce_gradients(self, model: torch.nn.Module) -> None:
        """``ddp``: the gradients averaged over the ranks (all-reduce SUM / world size) in flat buckets of
        ``distributed.bucket_mb``; a parameter without a gradient on this rank counts as zeros (it may have
        one on another). Averaging matches the losses' ``num_processes`` convention (docs/losses.md section
        4): each rank's loss is scaled so that the MEAN of the ranks' gradients is the single-process one.
        ``fsdp2`` and one process: nothing to do."""
        if self.mode != "ddp":
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        buckets: list[list[torch.Tensor]] = []
        size = 0
        for p in params:
            nbytes = p.grad.numel() * p.grad.element_size()
            if not buckets or (size + nbytes > self.bucket_bytes and buckets[-1]):
                buckets.append([])
                size = 0
            if buckets[-1] and buckets[-1][0].dtype != p.grad.dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(p.grad)
            size += nbytes
        for grads in buckets:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            for g, r in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(r)

    @staticmethod
    def to_float(value) -> float:
        """A (possibly DTensor, under FSDP2) scalar as a Python float: the full value."""
        full = getattr(value, "full_tensor", None)
        return float(full() if callable(full) else value)

    # ------------------------------------------------------------------------------------------------------
    # Metrics
    # ------------------------------------------------------------------------------------------------------

    def reduce_sums(self, agg: dict) -> dict:
        """The loss metrics' (sum, count) pairs summed over the ranks (one all-reduce)."""
        if not self.enabled or not agg:
            return agg
        from reasonrl.loss_types import Sum

        names = sorted(agg)
        pairs = [(agg[n].sum.detach().double().sum(), agg[n].count.detach().double().sum()) for n in names]
        flat = torch.stack([torch.stack(pair).cpu() for pair in pairs])
        flat = self._all_reduce_cpu(flat)
        return {n: Sum(flat[i, 0], flat[i, 1]) for i, n in enumerate(names)}

    def _all_reduce_cpu(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce of a CPU tensor through the process group's device; returns the CPU result."""
        dev = t.to(self.device)
        self.all_reduce(dev, op)
        return dev.cpu()

    def reduce_metrics(self, m: dict, weights: dict[str, float]) -> dict:
        """One step's metrics over the whole global batch, the same on every rank.

        Per key: ``time/*`` the slowest rank's; ``tokens`` summed (``tokens_per_s`` recomputed from it);
        keys in ``weights`` (NaN-skipping means: rewards, R3 terms) averaged with those weights (the number of
        values that entered the mean on this rank); values the ranks share already (the step, the learning
        rate, the gradient norm, the loss metrics reduced by :meth:`reduce_sums`) kept; everything else is a
        mean over an equal number of rows per rank, so the mean over ranks.
        """
        if not self.enabled:
            return m
        import torch.distributed as dist

        keys = sorted(k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, keys)
        if any(g != keys for g in gathered):
            raise RuntimeError(f"the ranks' step metrics differ in their keys: {gathered}")
        shared = {"step", "lr", "grad_norm", "entropy_coef", "kl", "entropy", "ratio", "ppo_kl", "clip_ratio"}
        summed, maxed, mean_keys = [], [], []
        for k in keys:
            if k in shared or k == "tokens_per_s":
                continue
            if k.startswith("time/"):
                maxed.append(k)
            elif k == "tokens":
                summed.append(k)
            else:
                mean_keys.append(k)
        vals = []
        for k in summed:
            vals += [float(m[k]), 1.0]
        for k in mean_keys:
            w = float(weights.get(k, 1.0))
            v = float(m[k])
            # A NaN mean (nothing to average on this rank) enters with weight 0.
            vals += [0.0, 0.0] if (w == 0.0 or math.isnan(v)) else [v * w, w]
        red = self._all_reduce_cpu(torch.tensor(vals, dtype=torch.float64)) if vals else torch.zeros(0)
        out = dict(m)
        i = 0
        for k in summed:
            out[k] = type(m[k])(red[i].item())
            i += 2
        for k in mean_keys:
            s, w = red[i].item(), red[i + 1].item()
            out[k] = s / w if w > 0 else math.nan
            i += 2
        if maxed:
            mx = self._all_reduce_cpu(torch.tensor([float(m[k]) for k in maxed], dtype=torch.float64), "max")
            for j, k in enumerate(maxed):
                out[k] = round(mx[j].item(), 4)
        if "tokens_per_s" in m and "tokens" in out:
            out["tokens_per_s"] = out["tokens"] / max(out.get("time/step", 0.0), 1e-9)
        return out

    # ------------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------------

    def full_state_dicts(self, model, optimizer) -> tuple[dict | None, dict | None]:
        """``fsdp2``: the full (unsharded) model and optimiser state dicts, on rank 0's CPU (None elsewhere);
        a collective, every rank calls it. Otherwise ``(None, None)``: the module's own state is whole."""
        if not self.fsdp:
            return None, None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
        return (model_sd, optim_sd) if self.is_main else (None, None)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _is_fsdp(model) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def metric_weights(rec) -> dict[str, float]:
    """The weights of the NaN-skipping means of ``Trainer._metrics`` on this rank (how many values each
    saw), for :meth:`DistContext.reduce_metrics`: ``reward`` (rows with a score), ``reward/<name>``,
    ``r3``, ``r_len``."""

    def count(t: torch.Tensor) -> float:
        return float((~torch.isnan(t.float())).sum())

    w = {"reward": float((~torch.isnan(rec.rewards).all(1)).sum())}
    for j, name in enumerate(rec.reward_names):
        w[f"reward/{name}"] = count(rec.rewards[:, j])
        diag = rec.reward_outputs[name].diagnostics
        for key in ("r3", "r_len"):
            if isinstance(diag.get(key), torch.Tensor):
                w[key] = count(diag[key])
    return w
