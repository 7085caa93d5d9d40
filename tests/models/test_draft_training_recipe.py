"""`SpecVLMDraftConfig.training_recipe`: provenance of how a draft was trained, saved and loaded with the config."""

from __future__ import annotations

from specvlm_hf import SpecVLMDraftConfig

RECIPE = {
    "ttt_steps": 7,
    "ttt_decay": 0.8,
    "multi_layer_features": True,
    "target_layer_ids": [2, 16, 29],
    "lambda_logit": 0.1,
    "lambda_feat": 1.0,
    "feature_noise": 0.0,
}


def test_the_recipe_round_trips_and_defaults_to_none(tmp_path):
    assert SpecVLMDraftConfig(hidden_size=64, num_attention_heads=4).training_recipe is None
    config = SpecVLMDraftConfig(
        hidden_size=64, num_attention_heads=4, target_layer_ids=[2, 16, 29], training_recipe=RECIPE
    )
    config.save_pretrained(tmp_path)
    loaded = SpecVLMDraftConfig.from_pretrained(tmp_path)
    assert loaded.training_recipe == RECIPE and loaded.target_layer_ids == [2, 16, 29]
    assert SpecVLMDraftConfig.from_dict(config.to_dict()).training_recipe == RECIPE
