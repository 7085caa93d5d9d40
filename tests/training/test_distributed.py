"""
`OnlineDistillationTrainer` under `accelerate launch --num_processes 2` on the CPU (gloo): one update equals one
process with the combined batch; the teacher is placed and frozen on every rank; only rank 0 saves the draft.

About 20-30 s on 2 CPU cores (two processes start, each builds the tiny target), so it runs in the normal suite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import specvlm_hf

from .training_helpers import make_records

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not installed")
def test_two_processes_update_the_draft_like_one_process_with_the_combined_batch(target, image_dir, tmp_path):
    records = make_records(1, image_dir, seed=2, answer_words=(1, 1)) + make_records(
        1, image_dir, seed=3, answer_words=(14, 14)
    )  # unequal token counts: a per-process mean would differ from the combined batch
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launched = tmp_path / "launched"
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(WORKER), str(data), str(launched), "1", "2",
    ]  # fmt: skip
    result = subprocess.run(command, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reports = [json.loads((launched / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["num_processes"] == 2 and report["process_index"] == rank
        assert report["backend"] == "gloo" and report["distributed_type"] == "DistributedType.MULTI_CPU"
        assert report["draft_wrapped_by"] == "DistributedDataParallel"
        assert report["teacher_frozen"] and report["teacher_unchanged"] and report["teacher_is_not_a_submodule"]
        assert report["teacher_device"] == "cpu" and report["global_step"] == 1
        assert report["training_recipe"]["ttt_steps"] == 2
    assert [report["saves"] for report in reports] == [1, 0]  # the draft alone, by rank 0

    single = tmp_path / "single"
    result = subprocess.run(
        [sys.executable, str(WORKER), str(data), str(single), "2", "2"], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two, one = load_file(launched / "model.safetensors"), load_file(single / "model.safetensors")
    torch.manual_seed(7)
    initial = specvlm_hf.SpecVLMDraftModel.from_target(target, target_layer_ids=[1, -1], draft_vocab_size=40)
    initial = initial.state_dict()
    assert set(two) == set(one) == set(initial)
    assert max((one[name] - initial[name]).abs().max().item() for name in one) > 1e-3  # the update moved it
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
