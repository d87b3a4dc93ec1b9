"""The trainer's hot path is fused: with the fused-linear loss, no tensor with a vocabulary-sized last
dimension and more than one row chunk of rows is created during the old-log-prob pass, the reward scoring or
the loss forward + backward. Watched with a TorchDispatchMode over every op's outputs (not by reading the
code); the same watch on the logits path sees the full [B, T, V] logits, so the check can fail."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from reasonrl.tasks.arithmetic import ArithmeticTask
from reasonrl.tasks.build_model import encode_example
from reasonrl.trainer import Rollouts, Trainer

CHUNK = 8  # rows per logits chunk of the fused loss and of the fused log-prob pass


class VocabWatch(TorchDispatchMode):
    """Records the largest row count of any op output whose last dimension is the vocabulary size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.max_rows, self.worst = vocab, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                rows = t.numel() // self.vocab
                if rows > self.max_rows:
                    self.max_rows, self.worst = rows, (str(func), tuple(t.shape))
        return out


class GoldBackend:
    """Scripted rollouts (the gold completions, some cut short): generation is not part of the watched path
    (transformers' sampler holds [sequences, V] logits of one position, which is not a chunking question)."""

    def __init__(self, tokenizer, problems):
        self.tok, self.problems, self.calls = tokenizer, problems, 0

    def sync_weights(self, model):
        pass

    def generate(self, prompt_ids, params):
        out, trunc = [], []
        for i, _ in enumerate(prompt_ids):
            _, completion = encode_example(self.tok, self.problems[self.calls * len(prompt_ids) + i])
            for k in range(params.num_samples):
                cut = len(completion) - 2 * k  # different lengths and answers across the group
                out.append(completion[:cut])
                trunc.append(k > 0)
        self.calls += 1
        return Rollouts(out, trunc)


@pytest.mark.parametrize("loss_impl", ["fused_linear", "logits"])
def test_no_vocab_sized_tensor_beyond_one_chunk(small_config, tmp_path, embedded, loss_impl):
    model, tok = copy.deepcopy(embedded[0]), embedded[1]
    vocab = model.get_output_embeddings().weight.shape[0]
    hidden = model.get_output_embeddings().weight.shape[1]
    assert vocab != hidden  # otherwise the weight gradient [V, H] would look vocabulary-sized
    cfg = small_config(
        tmp_path,
        f"loss_impl={loss_impl}",
        f"chunk_rows={CHUNK}",
        f"logprob_workspace_bytes={CHUNK * (vocab + hidden) * 4}",
        "loss.beta=0.01",
        "rollout.mask_truncated_completions=false",
        "rewards=[{name: r3, options: {max_batch_tokens: 64}}]",
    )
    problems = ArithmeticTask(seed=3).problems("train", 8)
    items = [{"prompt": p.prompt, "reference": p.reference, "answers": p.answer} for p in problems]
    trainer = Trainer(cfg, model=model, tokenizer=tok, dataset=items, backend=GoldBackend(tok, problems))
    watch = VocabWatch(vocab)
    with watch:
        trainer.step()  # old log-probs (policy and reference), R3 scoring, loss forward + backward, optimiser
    rec = trainer.last_record
    tokens = int(rec.attention_mask.sum())
    assert tokens > 4 * CHUNK  # the batch is several chunks long, so an unchunked tensor would show
    if loss_impl == "fused_linear":
        assert watch.max_rows <= CHUNK, f"vocabulary-sized tensor of {watch.max_rows} rows: {watch.worst}"
    else:  # the logits path materialises [B, T, V]: the watch must see it
        assert watch.max_rows >= rec.input_ids.numel() - rec.input_ids.shape[0], watch.worst
