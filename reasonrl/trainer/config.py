"""The trainer's configuration: one dataclass, loaded from YAML, overridden on the command line
(docs/trainer.md section 2).

:class:`TrainerConfig` is the single source of truth; its sections are plain dataclasses. Loading and merging
go through OmegaConf structured configs (type checks, YAML, dot-list overrides such as ``loss.beta=0.01``),
never through hand-written parsing. Two sections are free-form mappings validated against the dataclass they
configure, so that every option of the library is reachable without being copied here:

* ``loss``: fields of :class:`reasonrl.losses.PolicyLossConfig` (``is_correction`` as a mapping of
  :class:`reasonrl.losses.ISCorrection` fields), applied over the base chosen by ``loss_preset``
  (``none``: the dataclass defaults; ``trl`` / ``verl``: ``PolicyLossConfig.from_trl`` / ``.from_verl`` of
  ``loss_preset_args``, a mapping of TRL ``GRPOConfig`` / verl actor-config field names).
* ``rewards[i].options``: fields of the reward's own config dataclass (``R3Config``, ``NumericAnswerConfig``,
  ``PEARConfig``, ``LaserConfig``).

An unknown key anywhere is a :class:`ConfigError` that lists the valid keys of its section.

Presets (``reasonrl/trainer/presets/<name>.yaml``): ``dro``, ``grpo``, ``pear``, ``laser``, each following its
paper (docs/trainer.md section 3 lists the sources and the values the papers leave open).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TrainerConfig",
    "RolloutConfig",
    "RewardSpec",
    "AdvantageConfig",
    "OptimConfig",
    "EntropyControlConfig",
    "R3FilterSettings",
    "EvalConfig",
    "LogConfig",
    "TaskConfig",
    "DistributedConfig",
    "ConfigError",
    "load_config",
    "PRESETS",
    "preset_path",
    "config_to_yaml",
    "build_loss_config",
]

PRESETS = ("dro", "grpo", "pear", "laser")
PACKING_ATTENTION = ("auto", "model", "flash_attention_2", "sdpa", "eager")
_PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """An invalid configuration: unknown key (with the valid ones), wrong type or out-of-range value."""


@dataclass
class TaskConfig:
    """The embedded arithmetic task (reasonrl.tasks.arithmetic). ``levels``: difficulty levels to train and
    evaluate on; ``seed``: the problem streams' seed."""

    name: str = "arithmetic"
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    seed: int = 0


@dataclass
class RolloutConfig:
    """Sampling of the K completions per prompt (the rollout backend, docs/trainer.md section 5).

    backend: ``"hf"`` (transformers ``generate`` with KV cache) or ``"module:Class"`` of a user backend.
    group_size: K completions per prompt. temperature / top_p / top_k (0: off) / max_new_tokens: sampling.
    generation_batch_size: prompts per ``generate`` call (0: all of them at once).
    mask_truncated_completions: completions without EOS get no loss (DAPO's overlong filtering; DRO masks
    them too).
    seed_per_prompt: sample each prompt's K completions with their own seed, derived from the step and the
    prompt's position in the global batch (one ``generate`` call per prompt), so that a prompt's rollouts do
    not depend on which other prompts share the call. Always on in a distributed run; set it in a single
    process to reproduce one (docs/trainer.md section 10).
    """

    backend: str = "hf"
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    generation_batch_size: int = 0
    mask_truncated_completions: bool = False
    seed_per_prompt: bool = False


@dataclass
class RewardSpec:
    """One reward of the (weighted) combination. name: ``r3`` (DRO), ``numeric`` (the numeric verifier),
    ``pear``, ``laser``, ``task`` (the embedded task's exact-integer verifier) or ``module:callable`` (a
    user reward following docs/rewards.md section 1). weight: its weight in the sum (``reward_weights`` of
    ``group_advantages``). options: fields of the reward's config dataclass."""

    name: str = "r3"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class R3FilterSettings:
    """DRO's R3-based data filtering (docs/rewards.md sections 2.1 and 2.5): ``enabled`` runs a round before
    training and then every ``interval_steps`` optimiser steps (0: once per pass over the prompt pool) over
    ``pool_size`` training prompts; ``options`` are fields of the rewards package's ``R3FilterConfig``."""

    enabled: bool = False
    interval_steps: int = 0
    pool_size: int = 256
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdvantageConfig:
    """Arguments of :func:`reasonrl.ops.group_advantages`: ``preset`` (``trl`` | ``verl``: eps, singleton,
    nan_policy, gdpo_final from :func:`reasonrl.ops.advantage_preset`) and the estimator options; a field
    left None keeps the preset's value."""

    preset: str = "trl"
    estimator: str = "grpo"
    scale: str = "group"
    eps: float | None = None
    multi_reward: str = "sum_then_normalize"
    singleton: str | None = None
    nan_policy: str | None = None
    gdpo_final: str | None = None
    whiten_eps: float = 1e-8
    gpg_f_norm: float = 1.0


@dataclass
class OptimConfig:
    """AdamW, linear warm-up then constant (``schedule="constant"``) or cosine decay to 0 (``"cosine"``).

    updates_per_batch: passes over each rollout batch (PPO epochs; old log-probs are kept from before the
    first). mini_batches: optimiser steps per pass (the batch split into equal mini-batches).
    micro_batch_size: sequences per forward/backward (gradient accumulation inside a mini-batch; 0: the
    whole mini-batch). micro_batch_tokens: with ``packing``, micro-batches by token budget instead:
    consecutive rows while their ``[prompt ; completion]`` tokens fit (0: off, micro_batch_size applies;
    docs/trainer.md section 11.3).
    """

    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_ratio: float = 0.0
    schedule: str = "constant"
    max_grad_norm: float = 1.0
    updates_per_batch: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 0
    micro_batch_tokens: int = 0


@dataclass
class EntropyControlConfig:
    """The adaptive entropy coefficient (docs/losses.md section 11.2, ``AdaptiveEntropyController``): when
    enabled it replaces ``loss.entropy_coef`` at every optimiser step."""

    enabled: bool = False
    initial_coef: float = 0.0
    target: float = 0.2
    delta: float = 0.005
    coef_min: float = 0.0
    coef_max: float = 1.0


@dataclass
class EvalConfig:
    """Held-out accuracy (greedy, the task's verifier) before training, every ``every`` steps (0: never in
    between) and after. ``size``: held-out problems."""

    size: int = 200
    every: int = 0
    max_new_tokens: int = 72
    batch_size: int = 64


@dataclass
class LogConfig:
    """out_dir: metrics.jsonl, curves.png, summary.json, checkpoints. progress: the progress bar.
    tensorboard: ``auto`` (when installed), ``on``, ``off``. plot: the PNG (needs matplotlib).
    save_every: checkpoint every N steps (0: only at the end); save_total_limit: checkpoints kept."""

    out_dir: str = "runs/reasonrl"
    progress: bool = True
    tensorboard: str = "auto"
    plot: bool = True
    save_every: int = 0
    save_total_limit: int = 2


@dataclass
class DistributedConfig:
    """Data parallelism under ``torchrun`` (docs/trainer.md section 10). ``mode``: ``auto`` (``ddp`` when the
    launcher's ``WORLD_SIZE`` is > 1, else a single process), ``off``, ``ddp`` (replicated model, gradients
    all-reduced) or ``fsdp2`` (``torch.distributed.fsdp.fully_shard`` per decoder layer and on the root).
    ``backend``: ``auto`` (``nccl`` on CUDA, ``gloo`` on the CPU), ``gloo`` or ``nccl``. ``timeout_s``: the
    collectives' timeout. ``bucket_mb``: size of the gradient all-reduce buckets of ``ddp``."""

    mode: str = "auto"
    backend: str = "auto"
    timeout_s: float = 1800.0
    bucket_mb: float = 25.0


@dataclass
class TrainerConfig:
    """Everything a run needs (docs/trainer.md section 2). ``model``: ``"embedded"`` (the tiny model shipped
    in reasonrl/assets) or a ``from_pretrained`` path / id; ``tokenizer``: None = the model's. ``steps``:
    optimiser-step budget is ``steps x updates_per_batch x mini_batches``; one step = one rollout batch of
    ``prompts_per_step x rollout.group_size`` completions. ``loss_impl``: ``fused_linear`` (default: the loss
    from hidden states and the lm_head, no logits) or ``logits``. ``chunk_rows``: rows per logits chunk of
    the fused loss (None: the library default). ``logprob_workspace_bytes``: chunk buffer of the fused
    old-log-prob pass (None: default). ``threads``: torch CPU threads (None: torch's default). ``resume``:
    continue from a checkpoint when :meth:`Trainer.train` starts: ``"latest"`` (the newest intact one under
    ``log.out_dir``, or step 0 when there is none) or a checkpoint / run folder (docs/trainer.md 7.1).
    ``packing``: run the forward passes on packed (padding-free) micro-batches (docs/trainer.md section 11;
    default off, see there why); ``packing_attention``: the attention of packed passes, ``auto``
    (flash_attention_2 when flash-attn, a CUDA device and a 16-bit dtype are there, else the model's own),
    ``model`` (keep it), or ``flash_attention_2`` / ``sdpa`` / ``eager``; ``packing_row_tokens``: row width
    of the SDPA / eager layout (0: the longest sequence of the micro-batch; flash-attention runs one row)."""

    model: str = "embedded"
    tokenizer: str | None = None
    seed: int = 0
    steps: int = 20
    prompts_per_step: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    loss_impl: str = "fused_linear"
    impl: str = "auto"
    chunk_rows: int | None = None
    logprob_workspace_bytes: int | None = None
    packing: bool = False
    packing_attention: str = "auto"
    packing_row_tokens: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="r3")])
    r3_filter: R3FilterSettings = field(default_factory=R3FilterSettings)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss_preset: str = "none"
    loss_preset_args: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)
    entropy_control: EntropyControlConfig = field(default_factory=EntropyControlConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    resume: str | None = None

    def __post_init__(self) -> None:
        validate(self)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(section: str, given: dict, cls) -> None:
    valid = _keys(cls)
    bad = [k for k in given if k not in valid]
    if bad:
        raise ConfigError(
            f"unknown key{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))} in {section}; "
            f"valid keys: {', '.join(valid)}"
        )


def validate(cfg: TrainerConfig) -> None:
    """Range checks of every section; the loss and reward options are checked by building their configs."""
    from reasonrl.ops.group_advantages import ESTIMATORS

    _check(cfg.steps >= 0, f"steps must be >= 0, got {cfg.steps}")
    _check(
        cfg.resume is None or (isinstance(cfg.resume, str) and cfg.resume.strip() != ""),
        f"resume must be 'latest' or a checkpoint path, got {cfg.resume!r}",
    )
    _check(cfg.prompts_per_step >= 1, f"prompts_per_step must be >= 1, got {cfg.prompts_per_step}")
    _check(
        cfg.loss_impl in ("fused_linear", "logits"),
        f"loss_impl must be 'fused_linear' or 'logits', got {cfg.loss_impl!r}",
    )
    _check(
        cfg.dtype in ("float32", "bfloat16", "float16"),
        f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}",
    )
    r = cfg.rollout
    _check(r.group_size >= 1, f"rollout.group_size must be >= 1, got {r.group_size}")
    _check(r.temperature > 0, f"rollout.temperature must be > 0, got {r.temperature}")
    _check(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    _check(r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}")
    _check(len(cfg.rewards) >= 1, "rewards: at least one reward is needed")
    for i, spec in enumerate(cfg.rewards):
        _check(
            isinstance(spec.name, str) and spec.name != "", f"rewards[{i}].name must be a non-empty string"
        )
    a = cfg.advantages
    _check(a.preset in ("trl", "verl"), f"advantages.preset must be 'trl' or 'verl', got {a.preset!r}")
    _check(
        a.estimator in ESTIMATORS, f"advantages.estimator must be one of {ESTIMATORS}, got {a.estimator!r}"
    )
    o = cfg.optim
    _check(o.lr >= 0, f"optim.lr must be >= 0, got {o.lr}")
    _check(
        o.schedule in ("constant", "cosine"),
        f"optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}",
    )
    _check(0 <= o.warmup_ratio < 1, f"optim.warmup_ratio must be in [0, 1), got {o.warmup_ratio}")
    _check(len(o.betas) == 2, f"optim.betas must have 2 values, got {o.betas}")
    _check(o.updates_per_batch >= 1, f"optim.updates_per_batch must be >= 1, got {o.updates_per_batch}")
    _check(o.mini_batches >= 1, f"optim.mini_batches must be >= 1, got {o.mini_batches}")
    batch = cfg.prompts_per_step * r.group_size
    _check(
        batch % o.mini_batches == 0,
        f"optim.mini_batches ({o.mini_batches}) must divide the rollout batch prompts_per_step x group_size "
        f"= {batch}",
    )
    _check(o.micro_batch_size >= 0, f"optim.micro_batch_size must be >= 0, got {o.micro_batch_size}")
    mini = batch // o.mini_batches
    # Equal micro-batches: TRL's grpo / dr_grpo / bnpo normalisations divide by the LOCAL micro-batch size
    # times GA (docs/losses.md 10.1), which adds up to the mini-batch's normalisation only when the sizes
    # are equal.
    _check(
        o.micro_batch_size == 0 or mini % o.micro_batch_size == 0,
        f"optim.micro_batch_size ({o.micro_batch_size}) must divide the mini-batch size (prompts_per_step "
        f"x group_size / mini_batches = {mini}) so that every micro-batch has the same size",
    )
    d = cfg.distributed
    mode = str(d.mode).lower()  # YAML reads `off` as a boolean
    d.mode = {"false": "off", "no": "off"}.get(mode, mode)
    _check(
        d.mode in ("auto", "off", "ddp", "fsdp2"),
        f"distributed.mode must be auto, off, ddp or fsdp2, got {d.mode!r}",
    )
    _check(
        d.backend in ("auto", "gloo", "nccl"),
        f"distributed.backend must be auto, gloo or nccl, got {d.backend!r}",
    )
    _check(d.timeout_s > 0, f"distributed.timeout_s must be > 0, got {d.timeout_s}")
    _check(d.bucket_mb > 0, f"distributed.bucket_mb must be > 0, got {d.bucket_mb}")
    _check(o.micro_batch_tokens >= 0, f"optim.micro_batch_tokens must be >= 0, got {o.micro_batch_tokens}")
    _check(
        o.micro_batch_tokens == 0 or cfg.packing,
        "optim.micro_batch_tokens needs packing=true (padded micro-batches are counted in sequences: "
        "optim.micro_batch_size)",
    )
    _check(cfg.packing_row_tokens >= 0, f"packing_row_tokens must be >= 0, got {cfg.packing_row_tokens}")
    _check(
        cfg.packing_attention in PACKING_ATTENTION,
        f"packing_attention must be one of {PACKING_ATTENTION}, got {cfg.packing_attention!r}",
    )
    # YAML reads on / off as booleans: accept them (and true / false) and normalise.
    tb = str(cfg.log.tensorboard).lower()
    cfg.log.tensorboard = {"true": "on", "yes": "on", "false": "off", "no": "off"}.get(tb, tb)
    _check(
        cfg.log.tensorboard in ("auto", "on", "off"),
        f"log.tensorboard must be auto, on or off, got {cfg.log.tensorboard!r}",
    )
    _check(
        cfg.loss_preset in ("none", "trl", "verl"),
        f"loss_preset must be 'none', 'trl' or 'verl', got {cfg.loss_preset!r}",
    )
    # The loss section: unknown keys and value checks of PolicyLossConfig.
    loss_config = build_loss_config(cfg)
    if o.micro_batch_tokens:
        from reasonrl.trainer.packing import check_token_budget_loss

        try:
            check_token_budget_loss(
                loss_config, entropy_bonus=loss_config.entropy_coef != 0 or cfg.entropy_control.enabled
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def build_loss_config(cfg: TrainerConfig):
    """The :class:`reasonrl.losses.PolicyLossConfig` of ``cfg``: the preset base, then the ``loss`` fields.
    ``temperature`` follows ``rollout.temperature`` unless ``loss`` sets it."""
    from reasonrl.losses import ISCorrection, PolicyLossConfig

    overrides = dict(cfg.loss)
    _unknown("loss", overrides, PolicyLossConfig)
    if isinstance(overrides.get("is_correction"), dict):
        _unknown("loss.is_correction", overrides["is_correction"], ISCorrection)
        overrides["is_correction"] = ISCorrection(**overrides["is_correction"])
    # The loss evaluates the policy at the temperature the rollouts were sampled with (also under a preset).
    overrides.setdefault("temperature", cfg.rollout.temperature)
    if cfg.loss_preset != "trl":
        # Dr. GRPO's constant L_max (docs/losses.md 10.1): the generation budget unless `loss` sets it.
        overrides.setdefault("max_completion_length", cfg.rollout.max_new_tokens)
    try:
        if cfg.loss_preset == "trl":
            base = PolicyLossConfig.from_trl(_trl_args(cfg.loss_preset_args))
        elif cfg.loss_preset == "verl":
            base = PolicyLossConfig.from_verl(dict(cfg.loss_preset_args))
        else:
            if cfg.loss_preset_args:
                raise ConfigError("loss_preset_args needs loss_preset='trl' or 'verl'")
            base = PolicyLossConfig()
        return dataclasses.replace(base, **overrides)
    except (ValueError, TypeError, NotImplementedError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"loss: {exc}") from exc


def _trl_args(args: dict):
    """A ``trl.GRPOConfig`` of ``args`` when TRL is installed (its own defaults and checks)."""
    try:
        from trl import GRPOConfig
    except ImportError as exc:
        raise ConfigError("loss_preset='trl' needs TRL (pip install 'reasonrl[trl]')") from exc
    _unknown("loss_preset_args", args, GRPOConfig)
    return GRPOConfig(output_dir=str(Path.cwd() / ".trl-unused"), report_to=[], **dict(args))


# ----------------------------------------------------------------------------------------------------------
# Loading: presets, YAML, overrides (OmegaConf)
# ----------------------------------------------------------------------------------------------------------


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return _PRESET_DIR / f"{name}.yaml"


def _section_class(path: list[str]):
    """The dataclass of the config section at ``path`` (for the list of valid keys in error messages)."""
    cls = TrainerConfig
    for part in path:
        f = {x.name: x for x in dataclasses.fields(cls)}.get(part)
        if f is None:
            break
        if part == "rewards":
            cls = RewardSpec
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            cls = type(default)
        else:
            break
    return cls


def load_config(
    config: str | Path | None = None, *, preset: str | None = None, overrides: list[str] | dict | None = None
) -> TrainerConfig:
    """A :class:`TrainerConfig` from (in order of increasing priority) its defaults, a preset, a YAML file
    and ``overrides`` (a dot-list ``["loss.beta=0.01", "steps=5"]`` or a nested dict).

    Raises:
        ConfigError: unknown keys (listing the valid keys of the section), type mismatches, invalid values.
    """
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    layers: list[tuple[str, Any]] = []
    if preset is not None:
        layers.append((f"preset {preset}", OmegaConf.load(preset_path(preset))))
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        layers.append((str(path), OmegaConf.load(path)))
    if isinstance(overrides, dict):
        layers.append(("overrides", OmegaConf.create(overrides)))
    elif overrides:
        for item in overrides:
            key, sep, value = str(item).partition("=")
            if not sep or not key:
                raise ConfigError(f"an override must look like key=value, got {item!r}")
            # The value is read as YAML (numbers, booleans, null, lists, mappings), as OmegaConf's dot-lists.
            layers.append(("command line", (key.strip(), yaml.safe_load(value) if value.strip() else "")))
    merged = OmegaConf.structured(TrainerConfig())
    for where, layer in layers:
        try:
            if isinstance(layer, tuple):  # one dotted key: update in place (list items by index: rewards.0.x)
                OmegaConf.update(merged, layer[0], layer[1], merge=True)
            else:
                merged = OmegaConf.merge(merged, layer)
        except (ConfigKeyError, ConfigAttributeError) as exc:
            key = getattr(exc, "full_key", None) or (layer[0] if isinstance(layer, tuple) else "?")
            section_parts = [p for p in str(key).split(".") if p][:-1]
            parts = [p for p in re.sub(r"\[\d+\]", "", str(key)).split(".") if p and not p.isdigit()]
            cls = _section_class(parts[:-1])
            section = ".".join(section_parts) or "the top level"
            raise ConfigError(
                f"unknown key {parts[-1] if parts else key!r} in {section} (from {where}); "
                f"valid keys: {', '.join(_keys(cls))}"
            ) from None
        except OmegaConfBaseException as exc:
            raise ConfigError(f"invalid configuration (from {where}): {exc}") from None
    try:
        return OmegaConf.to_object(merged)  # runs TrainerConfig.__post_init__ (validation)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def config_to_yaml(cfg: TrainerConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
