"""
One `OnlineDistillationTrainer` update on the tiny Llava target, run by `test_distributed.py` under
`accelerate launch --num_processes N --cpu` (gloo) or in a single process.

    python distributed_worker.py <data.jsonl> <output_dir> <per_device_batch_size> <ttt_steps> [streaming]

Writes the trained draft (rank 0 only, through `save_model`) and `rank<r>.json` per process: what the process saw of
the teacher (frozen, in eval mode, unchanged, on this process's device) and of the run.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import specvlm_hf
from specvlm_hf.testing import build_tiny_target
from specvlm_hf.testing.tiny_processors import build_tiny_processor
from specvlm_hf.training import OnlineDistillationConfig, OnlineDistillationTrainer


class RecordingTrainer(OnlineDistillationTrainer):
    """Counts the calls of `_save` that write files (every process calls it; only the saving process writes)."""

    saves = 0

    def _save(self, output_dir=None, state_dict=None):
        type(self).saves += int(self.args.should_save)
        super()._save(output_dir, state_dict=state_dict)


def run(
    data: str, output_dir: str, batch_size: int, ttt_steps: int, streaming: bool = False
) -> OnlineDistillationTrainer:
    target = build_tiny_target("llava", seed=0)
    processor = build_tiny_processor("llava")
    torch.manual_seed(7)
    draft = specvlm_hf.SpecVLMDraftModel.from_target(target, target_layer_ids=[1, -1], draft_vocab_size=40)
    teacher_before = {name: tensor.clone() for name, tensor in target.state_dict().items()}
    args = OnlineDistillationConfig(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        eval_acceptance_prompts=0,
        use_cpu=True,
        seed=0,
        ttt_steps=ttt_steps,
        streaming=streaming,
        streaming_shuffle_buffer_size=0,
    )
    trainer = RecordingTrainer(
        model=draft, teacher=target, args=args, train_dataset=data, processing_class=processor
    )
    trainer.train()
    trainer.save_model()
    state = trainer.accelerator.state
    report = {
        "num_processes": state.num_processes,
        "process_index": state.process_index,
        "backend": getattr(state, "backend", None),
        "distributed_type": str(state.distributed_type),
        "teacher_frozen": not target.training and not any(p.requires_grad for p in target.parameters()),
        "teacher_unchanged": all(torch.equal(t, teacher_before[n]) for n, t in target.state_dict().items()),
        "teacher_device": str(next(target.parameters()).device),
        "teacher_is_not_a_submodule": not any(m is target for m in trainer.model_wrapped.modules()),
        "global_step": trainer.state.global_step,
        "train_dataset": type(trainer.train_dataset).__name__,
        "saves": RecordingTrainer.saves,
        "draft_wrapped_by": type(trainer.model_wrapped).__name__,
        "training_recipe": trainer.accelerator.unwrap_model(trainer.model_wrapped).config.training_recipe,
    }
    with open(os.path.join(output_dir, f"rank{state.process_index}.json"), "w") as handle:
        json.dump(report, handle)
    return trainer


if __name__ == "__main__":
    from specvlm_hf.training.cli import finish_distributed

    torch.set_num_threads(1)
    data_path, out, size, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    trainer = run(data_path, out, size, steps, streaming=sys.argv[5:] == ["streaming"])
    finish_distributed(trainer)
