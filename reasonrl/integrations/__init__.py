"""Drop-ins for the trainers people already run (docs/integrations-trl.md, docs/integrations-verl.md).

* ``reasonrl.integrations.trl``: ``GRPOTrainer``, a subclass of TRL's ``GRPOTrainer`` (same constructor and
  ``GRPOConfig``) whose log-probs, entropies and loss run on reasonrl's fused lm_head ops, and
  ``patch(trainer)`` for an existing TRL trainer.
* ``reasonrl.integrations.verl``: reasonrl's policy losses in verl's registry (``reasonrl_<mode>``) and the
  fused log-prob + entropy forward as ``fused_kernel_options.impl_backend: reasonrl``.

The submodules import their trainer (``trl`` / ``verl``) when imported; ``import reasonrl`` never does.
"""
