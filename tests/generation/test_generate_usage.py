"""Every documented way of calling `generate` gives, with a SpecVLM draft, exactly what plain `generate` gives.

The usage matrix (issue #12): pipelines, chat templates, `past_key_values` (in `test_cache_reuse.py`), prompt lookup
alongside the draft, streamers, stopping criteria (custom, eos lists), logits processors (custom and
from the generation config), a `GenerationConfig` object, and PEFT-wrapped targets. Each case also checks that the
tree loop really ran, so a silently dropped draft cannot pass. (`stop_strings` is not covered: transformers'
`StopStringCriteria` cannot read the tiny word-level tokenizer's vocabulary, with or without a draft; the loop checks
every stopping criterion after every emitted token, which `custom_stopping` covers.)
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TextStreamer,
    pipeline,
)

from specvlm_hf import SpecVLMDraftModel
from specvlm_hf.generation import loop
from specvlm_hf.testing.tiny_models import build_tiny_target, make_inputs
from specvlm_hf.testing.tiny_processors import build_tiny_processor

MAX_NEW = 12


@pytest.fixture(scope="module")
def llava():
    target = build_tiny_target("llava")
    torch.manual_seed(1)
    return target, SpecVLMDraftModel.from_target(target), build_tiny_processor("llava")


@pytest.fixture
def loop_calls(monkeypatch):
    """Counts calls of the tree loop (the route imports it at call time)."""
    calls = []
    original = loop.tree_assisted_decoding

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "tree_assisted_decoding", counting)
    return calls


def _messages(image: Image.Image | None = None, text: str = "what color is the cat ?") -> list[dict]:
    content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def _both(target, draft, inputs, **kwargs):
    plain = target.generate(**inputs, max_new_tokens=MAX_NEW, **kwargs)
    spec = target.generate(**inputs, max_new_tokens=MAX_NEW, assistant_model=draft, **kwargs)
    return plain, spec


def test_image_text_to_text_pipeline(llava, loop_calls):
    target, draft, processor = llava
    pipe = pipeline("image-text-to-text", model=target, processor=processor)
    image = Image.new("RGB", (24, 24), (200, 10, 10))
    plain = pipe(text=_messages(image), max_new_tokens=MAX_NEW, do_sample=False)
    spec = pipe(text=_messages(image), max_new_tokens=MAX_NEW, do_sample=False,
                generate_kwargs={"assistant_model": draft})
    assert spec[0]["generated_text"][-1]["content"] == plain[0]["generated_text"][-1]["content"]
    assert loop_calls


def test_chat_template_inputs(llava, loop_calls):
    target, draft, processor = llava
    image = Image.new("RGB", (24, 24), (10, 200, 10))
    inputs = processor.apply_chat_template(_messages(image), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    plain, spec = _both(target, draft, inputs, do_sample=False)
    assert spec.tolist() == plain.tolist()
    assert loop_calls


def test_prompt_lookup_alongside_the_draft_is_ignored_with_a_warning(llava, loop_calls, caplog):
    target, draft, _ = llava
    inputs = make_inputs("llava", target, with_image=True)
    plain = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    with caplog.at_level("WARNING"):
        spec = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=draft,
                               prompt_lookup_num_tokens=3, return_dict_in_generate=True)
    assert spec.sequences.tolist() == plain.tolist()
    assert spec.speculation.target_forwards >= 1 and loop_calls


def test_text_streamer_gets_the_same_text(llava, capsys):
    target, draft, processor = llava
    inputs = make_inputs("llava", target, with_image=True)
    texts = []
    for assistant in (None, draft):
        target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, assistant_model=assistant,
                        streamer=TextStreamer(processor.tokenizer, skip_prompt=True))
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_streamer_at_batch_two_is_refused_clearly(llava):
    target, draft, _ = llava
    inputs = make_inputs("llava", target, with_image=True, batch_size=2)

    class Collect:
        def put(self, value):
            pass

        def end(self):
            pass

    with pytest.raises(ValueError, match="batch size 1 only"):
        target.generate(**inputs, max_new_tokens=4, do_sample=False, assistant_model=draft, streamer=Collect())


class _BanToken(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


class _StopOnToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize(
    "case",
    ["custom_processor", "config_processors", "custom_stopping", "eos_list", "generation_config_object"],
)
def test_processors_and_criteria(llava, loop_calls, case, do_sample):
    target, draft, _ = llava
    inputs = make_inputs("llava", target, with_image=True)
    reference = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    kwargs: dict = {"do_sample": do_sample}
    if case == "custom_processor":
        kwargs["logits_processor"] = LogitsProcessorList([_BanToken(int(reference[1]))])
    elif case == "config_processors":
        kwargs.update(repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=5,
                      bad_words_ids=[[int(reference[2])]], suppress_tokens=[int(reference[3])])
    elif case == "custom_stopping":
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopOnToken(int(reference[4]))])
    elif case == "eos_list":
        kwargs["eos_token_id"] = [int(reference[5]), 2]
    elif case == "generation_config_object":
        kwargs = {"generation_config": GenerationConfig(do_sample=do_sample, max_new_tokens=MAX_NEW, top_k=8,
                                                        pad_token_id=0, eos_token_id=2)}
    torch.manual_seed(3)
    plain = target.generate(**inputs, max_new_tokens=MAX_NEW, **kwargs)
    torch.manual_seed(3)
    spec = target.generate(**inputs, max_new_tokens=MAX_NEW, assistant_model=draft, **kwargs)
    assert spec.tolist() == plain.tolist()
    assert loop_calls
    if case == "custom_stopping" and not do_sample:
        assert plain.shape[1] < inputs["input_ids"].shape[1] + MAX_NEW  # the criterion did fire


def test_peft_wrapped_target(loop_calls):
    peft = pytest.importorskip("peft")
    target = build_tiny_target("llama")
    torch.manual_seed(2)
    model = peft.get_peft_model(target, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                        init_lora_weights=False))
    draft = SpecVLMDraftModel.from_target(target)
    inputs = make_inputs("llama", target, with_image=False)
    plain, spec = _both(model, draft, inputs, do_sample=False)
    no_lora = target.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    with model.disable_adapter():
        no_lora = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    assert spec.tolist() == plain.tolist()
    assert no_lora.tolist() != plain.tolist()  # the adapter is active and changes the output
    assert loop_calls
