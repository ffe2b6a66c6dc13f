import pytest
from transformers import HfArgumentParser

from hf_blockprune import BlockPruningConfig


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"pruning_preset": "tiny"}, "pruning_preset"),
        ({"pruning_method": "magnitude"}, "pruning_method"),
        ({"attention_granularity": "row"}, "attention_granularity"),
        ({"ffn_granularity": "head"}, "ffn_granularity"),
        ({"attention_block_size": [32]}, "attention_block_size"),
        ({"attention_block_size": [0, 32]}, "attention_block_size"),
        ({"ffn_block_size": [32, -1]}, "ffn_block_size"),
        ({"pruning_method": "topk", "final_threshold": 0.0}, "final_threshold"),
        ({"pruning_method": "topk", "initial_threshold": 1.5}, "initial_threshold"),
        ({"pruning_method": "sigmoid_threshold", "final_threshold": 1.0}, "final_threshold"),
        ({"pruning_method": "sigmoid_threshold", "initial_threshold": -0.1}, "initial_threshold"),
        ({"initial_warmup": -0.1}, "initial_warmup"),
        ({"final_warmup": 1.0}, "final_warmup"),
        ({"initial_warmup": 0.6, "final_warmup": 0.5}, "initial_warmup"),
        ({"final_lambda": -1.0}, "final_lambda"),
        ({"final_lambda": float("inf")}, "final_lambda"),
        ({"mask_scores_learning_rate": 0.0}, "mask_scores_learning_rate"),
        ({"mask_init_value": float("nan")}, "mask_init_value"),
        ({"attention_modules": ["q", "k", "v", "o"]}, "layers_pattern"),
        ({"layers_pattern": "h", "attention_modules": ["q", "k", "v"]}, "attention_modules"),
        ({"layers_pattern": "h", "ffn_modules": ["fc1"]}, "ffn_modules"),
        ({"layers_pattern": "h"}, "layers_pattern"),
        ({"fill_after": 0.5, "final_warmup": 0.3}, "fill_after"),
        ({"fill_after": 1.5}, "fill_after"),
        ({"target_density": 0.0}, "target_density"),
        ({"target_density_attention": 1.5}, "target_density_attention"),
        ({"target_density_ffn": -0.1}, "target_density_ffn"),
        ({"target_density": 0.5, "target_density_ffn": 0.5}, "target_density"),
        ({"target_speedup": 1.0}, "target_speedup"),
        ({"target_speedup": 2.0, "target_density": 0.5}, "target_speedup"),
        ({"speedup_sequence_length": 0}, "speedup_sequence_length"),
        ({"target_rate": 0.0}, "target_rate"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        BlockPruningConfig(**kwargs)


@pytest.mark.parametrize(
    "preset, attention, ffn",
    [("hybrid", "block", "neuron"), ("struct", "head", "neuron"), ("block", "block", "block")],
)
def test_presets(preset, attention, ffn):
    config = BlockPruningConfig.from_preset(preset)
    assert (config.attention_granularity, config.ffn_granularity) == (attention, ffn)
    assert config.pruning_method == "sigmoid_threshold"
    assert (config.initial_threshold, config.final_threshold) == (0.0, 0.1)


def test_explicit_fields_override_preset_and_method_defaults():
    config = BlockPruningConfig.from_preset("hybrid", pruning_method="topk", attention_block_size=[16, 16])
    assert config.attention_block_size == [16, 16]
    assert (config.initial_threshold, config.final_threshold, config.final_lambda) == (1.0, 0.5, 0.0)


def test_hf_argument_parser_turns_fields_into_flags():
    parser = HfArgumentParser(BlockPruningConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--pruning_preset", "hybrid", "--final_lambda", "10", "--attention_block_size", "16", "16"]
    )
    assert config.final_lambda == 10.0 and config.attention_block_size == [16, 16]
    assert config.ffn_granularity == "neuron"
    for action in parser._actions[1:]:
        assert action.help, f"{action.dest} has no help text"


def test_dict_round_trip():
    config = BlockPruningConfig.from_preset("struct", final_lambda=3.0)
    assert BlockPruningConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("field", ["distillation_temperature", "target_rate", "target_speedup", "final_lambda",
                                   "mask_scores_learning_rate", "target_density"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_numbers_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        BlockPruningConfig.from_preset("hybrid", **{field: value})
