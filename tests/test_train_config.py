"""train/config.py: a config type per task over the settings every task shares."""
from __future__ import annotations

import dataclasses

import pytest

from lstmgen.train.config import (PRESETS, FrameTrainConfig, RunConfig, TrainConfig, config_from_dict, for_task,
                                  preset)


def test_each_task_has_its_own_fields_and_shares_the_rest():
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    text = {f.name for f in dataclasses.fields(TrainConfig)} - shared
    frames = {f.name for f in dataclasses.fields(FrameTrainConfig)} - shared
    assert text == {"embedding_size", "tie_weights", "level", "min_count", "max_vocab"}
    assert frames == {"projection_size", "standardize", "stream"}
    assert {type(c).__name__ for c in PRESETS.values()} == {"TrainConfig", "FrameTrainConfig"}
    assert all((type(c) is TrainConfig) == (c.task == "lm") for c in PRESETS.values())


def test_a_preset_of_one_task_becomes_the_other_with_its_shared_settings():
    cfg = preset("tiny", task="regression", projection_size=4)
    tiny = PRESETS["tiny"]
    assert type(cfg) is FrameTrainConfig and cfg.task == "regression" and cfg.projection_size == 4
    assert (cfg.hidden_size, cfg.batch_size, cfg.lr, cfg.optimizer) == (tiny.hidden_size, tiny.batch_size, tiny.lr,
                                                                        tiny.optimizer)
    back = for_task(cfg, "lm")
    assert type(back) is TrainConfig and back.level == TrainConfig().level  # the text fields' defaults
    with pytest.raises(ValueError, match="level applies to --task lm, not regression"):
        preset("sin-cos", level="word")
    with pytest.raises(ValueError, match="projection_size, stream apply to --task regression or classification"):
        preset("tiny", projection_size=3, stream=True)


def test_saved_configs_of_either_shape_load_as_their_task():
    flat = {**dataclasses.asdict(TrainConfig()), "projection_size": 0, "standardize": "none", "stream": False}
    assert config_from_dict(flat) == TrainConfig()
    frames = {**flat, "task": "classification", "projection_size": 8}
    cfg = config_from_dict(frames)
    assert type(cfg) is FrameTrainConfig and cfg.projection_size == 8 and not hasattr(cfg, "level")
    assert config_from_dict({"task": "lm"}) == TrainConfig()  # older: fields added since take their defaults
