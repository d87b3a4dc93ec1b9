"""Train TRL's GRPOTrainer with DRO's R3 reward, through reasonrl's drop-in (docs/integrations-trl.md).

Runs offline on CPU in about a minute: a tiny random Qwen2 built from a config and a word-level tokenizer
built in memory (a real run loads both with ``from_pretrained``). The policy scores its own rollouts (R3's
``reward_policy="current"``): for each prompt, the reference answer is teacher-forced after every sampled
reasoning trace (up to ``</think>``), and the answer tokens whose log-probability varies across the traces
weigh the most. A random model rarely closes its reasoning, so many rollouts are "invalid" (no ``</think>``):
R3 returns None for them, which TRL leaves out of the group statistics.

    python examples/trl_grpo_r3.py --steps 2
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig

from reasonrl.integrations.trl import GRPOTrainer  # the one changed line: was `from trl import GRPOTrainer`
from reasonrl.rewards import R3Reward, as_trl_reward
from reasonrl.testing import tiny_causal_lm, word_tokenizer  # test-size model and tokenizer builders


def tiny_tokenizer(vocab: int):
    """Words "w0" ... plus "</think>" (id 3): whitespace-separated, no download."""
    words = ["<unk>", "<pad>", "<eos>", "</think>"] + [f"w{i}" for i in range(vocab - 4)]
    return word_tokenizer(words, unk="<unk>", pad="<pad>", eos="<eos>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=40, help="small, so that random rollouts emit </think>")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(args.vocab)
    # A random Qwen2 of ~60k parameters (tied embeddings), the shape of a real one.
    model = tiny_causal_lm("qwen2", args.vocab, hidden_size=64, max_positions=256, tie=True,
                           pad_token_id=1, eos_token_id=2, bos_token_id=None)
    data = Dataset.from_dict(
        {
            "prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11"],
            "answer": ["w12 w13", "w14", "w15 w16 w17", "w18 w19"],  # the reference outcome R3 teacher-forces
        }
    )
    # R3 scores with the policy itself; "" as the answer prefix because this tokenizer has no "\n\n" token.
    r3 = R3Reward(model, tokenizer, think_end="</think>", answer_prefix="", append_eos=False)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        max_steps=args.steps,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        loss_type="dapo",
        beta=0.0,
        entropy_coef=0.001,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[as_trl_reward(r3, reference_column="answer", name="r3")],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.train()
    for entry in trainer.state.log_history:
        keys = ("loss", "reward", "rewards/r3/mean", "entropy", "r3/status_ok")
        print({k: entry[k] for k in keys if k in entry})


if __name__ == "__main__":
    main()
