"""
`OnlineDistillationTrainer` under `accelerate launch --num_processes 2` on the CPU (gloo): one update equals one
process with the combined batch, from in-memory data and from a stream; the teacher is placed and frozen on every
rank; only rank 0 writes the draft.

About 12-25 s per launch on 2 CPU cores (two processes start, each builds the tiny target), 30-50 s for the module,
so it runs in the normal suite.
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
from specvlm_hf.testing import build_tiny_target

from .training_helpers import make_records, write_images

WORKER = Path(__file__).with_name("distributed_worker.py")

pytestmark = pytest.mark.skipif(shutil.which("accelerate") is None, reason="the accelerate launcher is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes, gloo
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two records of very unequal token counts, clean (JSONL) and with bad lines around them (for the stream)."""
    root = tmp_path_factory.mktemp("distributed")
    write_images(root)
    records = make_records(1, root, seed=2, answer_words=(1, 1)) + make_records(1, root, seed=3, answer_words=(14, 14))
    lines = [json.dumps(record) for record in records]
    clean, messy = root / "data.jsonl", root / "messy.jsonl"
    clean.write_text("\n".join(lines) + "\n", encoding="utf-8")
    messy.write_text("\n".join(["{torn", lines[0], '{"conversations": []}', lines[1]]) + "\n", encoding="utf-8")
    return {"clean": clean, "messy": messy, "root": root}


@pytest.fixture(scope="module")
def single_process(data) -> dict[str, torch.Tensor]:
    """The draft after one update in one process with both records in one batch."""
    from .distributed_worker import run

    out = data["root"] / "single"
    run(str(data["clean"]), str(out), batch_size=2, ttt_steps=2)  # in this process: no second start-up
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("mode", ["in-memory", "streaming"])
def test_two_processes_update_the_draft_like_one_process_with_the_combined_batch(mode, data, single_process, tmp_path):
    launched = tmp_path / "launched"
    source = data["messy"] if mode == "streaming" else data["clean"]
    command = [
        "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(WORKER), str(source), str(launched), "1", "2", *(["streaming"] if mode == "streaming" else []),
    ]  # fmt: skip
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reports = [json.loads((launched / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report["num_processes"] == 2 and report["process_index"] == rank
        assert report["backend"] == "gloo" and report["distributed_type"] == "DistributedType.MULTI_CPU"
        assert report["draft_wrapped_by"] == "DistributedDataParallel"
        assert report["teacher_frozen"] and report["teacher_unchanged"] and report["teacher_is_not_a_submodule"]
        assert report["teacher_device"] == "cpu" and report["global_step"] == 1
        assert report["training_recipe"]["ttt_steps"] == 2
        expected = "StreamingDistillationDataset" if mode == "streaming" else "DistillationDataset"
        assert report["train_dataset"] == expected
    assert [report["saves"] for report in reports] == [1, 0]  # the draft alone, written by rank 0

    two, one = load_file(launched / "model.safetensors"), single_process
    torch.manual_seed(7)
    initial = specvlm_hf.SpecVLMDraftModel.from_target(
        build_tiny_target("llava", seed=0), target_layer_ids=[1, -1], draft_vocab_size=40
    ).state_dict()
    assert set(two) == set(one) == set(initial)
    assert max((one[name] - initial[name]).abs().max().item() for name in one) > 1e-3  # the update moved it
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
