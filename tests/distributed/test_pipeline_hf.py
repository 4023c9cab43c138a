"""Pipeline parallelism on Hugging Face Transformers models, which torch.fx cannot trace
("co_varnames is too small"): `split_model` falls back to splitting by module, and the
schedule's loss wrapper hands the user's loss_fn the model's own ModelOutput.

1F1B and pp x tp on Llama, GPT-2, Mixtral and BERT are in tests/models/test_numerics.py;
here the other schedules and recompute on 2 ranks (Llama, GPT-2, BERT with its two tied
groups; torch.nn.Transformer, whose layers fx cannot see inside it), and Qwen2's embedding tied
to lm_head across stages with pp=2 x dp=2 on 4 ranks, ZeRO 0 and ZeRO 3: one spawn per world size.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx

from autoplan.backends.pipeline_split import split_model
from autoplan.zoo import build
from tests.distributed.equivalence import check_plans, plan_for

pytestmark = pytest.mark.distributed  # spawns gloo ranks

pytest.importorskip("transformers")


def _hf(name: str) -> str:
    return f"hf:tests/models/configs/{name}.json"


def test_hf_pipeline_schedules_and_recompute_train_like_one_process():
    check_plans(
        [
            plan_for(_hf("llama"), 2, pp=2, schedule="gpipe", recompute="full"),
            plan_for(_hf("gpt2"), 2, pp=2, schedule="gpipe", recompute="selective"),
            plan_for(_hf("bert"), 2, pp=2, schedule="interleaved_1f1b", virtual_stages=2),
            # torch.fx keeps nn.Transformer whole: split by module, where one tensor crosses
            plan_for("tests/models/foreign.py:transformer_seq2seq", 2, pp=2),
        ]
    )


def test_hf_tied_embedding_across_stages_with_data_parallel():
    check_plans(
        [
            plan_for(_hf("qwen2"), 4, pp=2, dp=2, schedule="gpipe", zero_stage=0),
            plan_for(_hf("qwen2"), 4, pp=2, dp=2, schedule="interleaved_1f1b", virtual_stages=2, zero_stage=3),
        ]
    )


def test_split_by_module_keeps_names_and_reproduces_forward():
    """Four stages of Llama: each holds its own layers under the model's names, and chaining
    the stages (activation, then the model's inputs) gives the model's ModelOutput."""
    job = build(_hf("llama"), batch_size=4, device="cpu", seed=0)
    blocks = [f"model.layers.{i}" for i in range(4)]
    stages = [
        ["model.embed_tokens", "model.rotary_emb", blocks[0]],
        [blocks[1]],
        [blocks[2]],
        [blocks[3], "model.norm", "lm_head"],
    ]
    split = split_model(job.module, stages, tuple(x[:2] for x in job.example_inputs))
    assert not any(isinstance(module, fx.GraphModule) for module in split.stage_modules)
    names = [{name for name, _ in module.named_parameters()} for module in split.stage_modules]
    assert set().union(*names) == set(job.module.state_dict())
    assert sum(len(n) for n in names) == len(job.module.state_dict())  # each parameter on one stage
    assert names[1] == {name for name in job.module.state_dict() if name.startswith("model.layers.1.")}
    values = job.example_inputs
    for module in split.stage_modules:
        values = module(*values)
    output = split.model_output(values)
    expected = job.module(*job.example_inputs)
    assert type(output) is type(expected)
    torch.testing.assert_close(output.logits, expected.logits, rtol=0, atol=0)


def test_qwen2_tied_embedding_is_copied_on_both_ends():
    job = build(_hf("qwen2"), batch_size=2, device="cpu", seed=0)
    stages = [
        ["model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1"],
        ["model.layers.2", "model.layers.3", "model.norm", "lm_head"],
    ]
    split = split_model(job.module, stages, job.example_inputs)
    assert split.tied_groups == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert split.holders(split.tied_groups[0]) == [0, 1]


def test_a_cut_that_more_than_one_tensor_crosses_names_the_layers():
    """T5: the decoder's layers read the encoder's output, which a cut inside the decoder
    would have to carry beside the decoder's activation."""
    job = build(_hf("t5"), batch_size=2, device="cpu", seed=0)
    encoder = [
        "encoder.embed_tokens",
        "decoder.embed_tokens",
        "encoder.dropout",
        "encoder.block.0",
        "encoder.block.1",
        "encoder.final_layer_norm",
    ]
    decoder = ["decoder.dropout", "decoder.block.0", "decoder.block.1", "decoder.final_layer_norm", "lm_head"]
    with pytest.raises(
        ValueError,
        match=r"torch.fx cannot trace T5ForConditionalGeneration.*"
        r"'decoder.block.1' reads \[[^]]*'encoder.final_layer_norm'",
    ):
        split_model(job.module, [encoder + decoder[:2], decoder[2:]], job.example_inputs)


def test_split_by_module_needs_example_inputs():
    job = build(_hf("gpt2"), batch_size=2, device="meta")
    stages = [
        ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0", "transformer.h.1"],
        ["transformer.h.2", "transformer.h.3", "transformer.ln_f", "lm_head"],
    ]
    with pytest.raises(ValueError, match="co_varnames is too small.*needs example_inputs"):
        split_model(job.module, stages)


class _ShapeBranchNet(torch.nn.Module):
    """Not traceable by torch.fx (control flow on a shape), with a parameter outside every
    layer that the glue of both stages reads, and layer `a` called `repeat` times."""

    def __init__(self, repeat: int):
        super().__init__()
        self.repeat = repeat
        self.emb = torch.nn.Embedding(10, 8)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 3)
        self.scale = torch.nn.Parameter(torch.full((8,), 2.0))

    def forward(self, tokens):
        h = self.emb(tokens) * self.scale
        if tokens.shape[1] > 1:
            h = h.flip(1)
        for _ in range(self.repeat):
            h = self.a(h) * self.scale
        return self.b(h)


def test_a_parameter_outside_every_layer_is_on_every_stage_and_summed():
    torch.manual_seed(0)
    model, tokens = _ShapeBranchNet(repeat=1), torch.randint(0, 10, (4, 8))
    split = split_model(model, [["emb", "a"], ["b"]], (tokens[:2],))
    assert split.tied_groups == [["scale"]] and split.holders(["scale"]) == [0, 1]
    received = split.stage_modules[0](tokens)
    torch.testing.assert_close(split.model_output(split.stage_modules[1](*received)), model(tokens))


def test_a_stage_cannot_end_after_a_layer_called_twice():
    model, tokens = _ShapeBranchNet(repeat=2), torch.randint(0, 10, (2, 8))
    with pytest.raises(ValueError, match="forward calls 'a' 2 times"):
        split_model(model, [["emb", "a"], ["b"]], (tokens,))
