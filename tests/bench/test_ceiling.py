"""The sampling acceptance ceiling (`specvlm_hf.bench.ceiling`): the cycle replay and the rank measurement."""

from __future__ import annotations

import json

import pytest
import torch

from specvlm_hf.bench.ceiling import ceiling_cycles, sampled_token_ranks, sampling_ceiling
from specvlm_hf.bench.prompts import load_prompts
from specvlm_hf.errors import UserValueError
from specvlm_hf.testing.tiny_models import build_tiny_target
from specvlm_hf.testing.tiny_processors import build_tiny_processor

from .conftest import write_prompts


def test_cycles_of_hand_made_rank_sequences():
    ranks = [0, 0, 3, 0, 9, 1, 0, 0, 0, 0]
    # k=2, depth 2: [0 0 | bonus 3] [0 | bonus 9] [1 0 | bonus 0] [0 0] -> 4 cycles
    assert ceiling_cycles(ranks, k=2, depth=2) == 4
    # k=1, depth 8: [0 0 | bonus 3] [0 | bonus 9] [| bonus 1] [0 0 0 0] -> 4 cycles
    assert ceiling_cycles(ranks, k=1, depth=8) == 4
    assert ceiling_cycles(ranks, k=100, depth=3) == 3  # every token a hit: cycles of depth + 1 tokens
    assert ceiling_cycles([5] * 7, k=2, depth=4) == 7  # never a hit: one token per cycle
    assert ceiling_cycles([], k=2, depth=4) == 0
    with pytest.raises(UserValueError, match="at least 1"):
        ceiling_cycles(ranks, k=0, depth=2)


def test_ranks_are_the_sampled_tokens_ranks_under_teacher_forcing():
    torch.manual_seed(0)
    target = build_tiny_target("llama").eval()
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 14, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    ranks, tokens = sampled_token_ranks(
        target, inputs, temperature=1.0, max_new_tokens=12, seed=3, top_k=0, top_p=1.0
    )
    torch.manual_seed(3)
    plain = target.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=12)
    emitted = plain[0, 5:]
    assert tokens == emitted.tolist()  # plain sampling's own tokens, same seed
    with torch.no_grad():
        logits = target(plain, attention_mask=torch.ones_like(plain)).logits[0, 4:-1].float()
    expected = (logits > logits.gather(1, emitted.view(-1, 1))).sum(1).tolist()
    assert ranks == expected
    assert any(rank > 0 for rank in ranks)  # a random tiny model samples off its argmax


def test_greedy_like_sampling_has_every_token_at_rank_zero():
    torch.manual_seed(0)
    target = build_tiny_target("llama").eval()
    inputs = {"input_ids": torch.tensor([[1, 5, 9]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert set(sampled_token_ranks(target, inputs, temperature=1.0, max_new_tokens=8, top_k=1)[0]) == {0}
    ranks, tokens = sampled_token_ranks(target, inputs, temperature=0.0, max_new_tokens=8)  # greedy
    assert set(ranks) == {0} and tokens == target.generate(**inputs, do_sample=False, max_new_tokens=8)[0, 3:].tolist()
    with pytest.raises(UserValueError, match=">= 0"):
        sampled_token_ranks(target, inputs, temperature=-1.0, max_new_tokens=8)


def test_sampling_ceiling_on_a_tiny_vlm(tmp_path):
    torch.manual_seed(0)
    target = build_tiny_target("llava").eval()
    prompts = load_prompts(write_prompts(tmp_path))
    ceiling = sampling_ceiling(
        target, build_tiny_processor(), prompts, ks=(1, 4, 10_000), depths=(1, 3), max_new_tokens=6, progress=False,
    )
    assert ceiling.prompts == 3 and ceiling.tokens == sum(ceiling.prompt_tokens) > 0
    assert all(0 < n <= 5 for n in ceiling.prompt_tokens)  # 6 new tokens at most, the first outside any cycle
    assert ceiling.top_k_hit_rate[10_000] == 1.0
    for depth in (1, 3):  # every token a hit: cycles of depth + 1 tokens
        cycles = sum(-(-n // (depth + 1)) for n in ceiling.prompt_tokens)
        assert ceiling.mean_accept_len[(10_000, depth)] == pytest.approx(ceiling.tokens / cycles)
    for depth in (1, 3):
        assert ceiling.mean_accept_len[(1, depth)] <= ceiling.mean_accept_len[(4, depth)]
        assert ceiling.mean_accept_len[(4, depth)] <= ceiling.mean_accept_len[(10_000, depth)] <= depth + 1
    assert ceiling.to_dict()["mean_accept_len"]["k4_d3"] == ceiling.mean_accept_len[(4, 3)]
    table = ceiling.to_markdown()
    assert table.count("\n") == 4 and "depth 3" in table and ceiling.in_draft_vocab is None

    # a draft vocabulary of every id covers everything; an empty one nothing
    everything = sampling_ceiling(target, build_tiny_processor(), prompts, ks=(1,), depths=(1,), max_new_tokens=6,
                                  progress=False, draft_vocab=torch.arange(target.config.get_text_config().vocab_size))
    assert everything.in_draft_vocab == 1.0 and "inside the draft's vocabulary: 1.000" in everything.to_markdown()
    nothing = sampling_ceiling(target, build_tiny_processor(), prompts, ks=(1,), depths=(1,), max_new_tokens=6,
                               progress=False, draft_vocab=torch.tensor([-1]))
    assert nothing.in_draft_vocab == 0.0


def test_the_example_script_writes_its_table(tiny_bench_assets, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "sampling_ceiling.py"
    spec = importlib.util.spec_from_file_location("sampling_ceiling_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "ceiling"
    assert example.main([
        "--target", str(tiny_bench_assets["target"]), "--prompts", str(tiny_bench_assets["prompts"]),
        "--draft", str(tiny_bench_assets["draft"]), "--ks", "1", "8", "--depths", "2", "--max-new-tokens", "5",
        "--out", str(out),
    ]) == 0
    record = json.loads((out / "ceiling.json").read_text())
    assert record["prompts"] == 3 and set(record["mean_accept_len"]) == {"k1_d2", "k8_d2"}
    assert record["in_draft_vocab"] is None  # the tiny draft has the full head: it can propose every id
    assert "| 8 |" in (out / "ceiling.md").read_text() and "| 8 |" in capsys.readouterr().out
