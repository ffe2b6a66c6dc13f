import torch

from hf_blockprune import BlockPruningConfig, apply_block_pruning, sparsity_report
from hf_blockprune.pruning.model import set_threshold

from conftest import tiny_model


def test_report_counts_dead_heads_blocks_and_neurons():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig(pruning_method="topk",
                                                                        attention_block_size=[8, 32]))
    layer = model.bert.encoder.layer[0]
    with torch.no_grad():
        for module in (layer.attention.self.query, layer.attention.self.key, layer.attention.output.dense):
            module.scores_module.scores.copy_(torch.tensor([[4.0], [3.0], [2.0], [1.0]]))
        layer.attention.self.value.scores_module.scores.copy_(torch.tensor([[4.0], [-3.0], [2.0], [1.0]]))
        layer.intermediate.dense.scores_module.scores.copy_(torch.arange(37.0))
    set_threshold(model, 0.5)
    report = sparsity_report(model)
    assert [entry["layer"] for entry in report] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    # value keeps heads 0 and 2; the output projection is cut by rows here, so no output column dies
    assert report[0]["heads_pruned"] == [[1, 3]]
    assert report[0]["attention_density"] == 0.5
    assert report[0]["ffn_neurons_kept"] == round(0.5 * 37) and report[0]["ffn_neurons_total"] == 37
