"""`pruning_preset="none"` (or no pruning flag at all): the trainer and the callback fine-tune without pruning."""

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments

from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer, is_block_pruned

from conftest import tiny_dataset, tiny_model, training_args


def test_a_parser_given_no_pruning_flag_prunes_nothing():
    parser = HfArgumentParser((TrainingArguments, BlockPruningConfig))
    _, config = parser.parse_args_into_dataclasses(["--output_dir", "x"])
    assert not config.enabled and config.no_pruning_implied
    _, config = parser.parse_args_into_dataclasses(["--output_dir", "x", "--pruning_preset", "none"])
    assert not config.enabled and not config.no_pruning_implied
    _, config = parser.parse_args_into_dataclasses(["--output_dir", "x", "--target_density", "0.3"])
    assert config.enabled


def test_none_with_a_pruning_field_is_an_error():
    with pytest.raises(ValueError, match="`target_density` asks for pruning"):
        BlockPruningConfig(pruning_preset="none", target_density=0.3)


def test_none_survives_a_round_trip():
    assert not BlockPruningConfig.from_dict(BlockPruningConfig().to_dict()).enabled


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_no_pruning_trains_like_a_plain_trainer(route, tmp_path, caplog):
    config = BlockPruningConfig()
    model = tiny_model("bert")
    args = training_args(tmp_path / "pruned", max_steps=10)
    with caplog.at_level("WARNING"):
        if route == "trainer":
            trainer = BlockPruningTrainer(model=model, args=args, train_dataset=tiny_dataset("bert"),
                                          pruning_config=config)
        else:
            trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset("bert"),
                              callbacks=[BlockPruningCallback(config)])
    assert "WITHOUT pruning" in caplog.text
    assert not is_block_pruned(trainer.model)
    trainer.train()
    plain = Trainer(model=tiny_model("bert"), args=training_args(tmp_path / "plain", max_steps=10),
                    train_dataset=tiny_dataset("bert"))
    plain.train()
    for (name, a), (_, b) in zip(trainer.model.named_parameters(), plain.model.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert not any(key.startswith("pruning/") for entry in trainer.state.log_history for key in entry)
    trainer.save_model()
    assert (tmp_path / "pruned" / "model.safetensors").is_file()
