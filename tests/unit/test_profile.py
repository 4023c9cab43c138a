"""profile_model: per-sequence FLOPs, saved bytes and tp collectives against hand arithmetic.

gpt-tiny: s = 32 tokens, h = 64, a = 4 heads, V = 128; mlp-tiny: d = 32, width 4d = 128.
Bytes are float32: 4 per element.
"""

from pathlib import Path

import pytest
import torch

from autoplan import zoo
from autoplan.analysis.profile import profile_model

S, H, A, V = 32, 64, 4, 128


@pytest.fixture(scope="module")
def gpt():
    job = zoo.build("gpt-tiny", batch_size=4, device="meta")
    return profile_model(job.module, job.example_inputs, model_name="gpt-tiny")


def layer(profile, name):
    return next(layer for layer in profile.layers if layer.name == name)


def test_model_fields(gpt):
    assert gpt.model_name == "gpt-tiny"
    assert gpt.global_batch_size == 4 and gpt.seq_len == S
    assert gpt.input_bytes == S * 8  # one sequence of int64 token ids
    # 4 blocks of 12 h^2 + 13 h, embeddings (V + s) h, final LayerNorm 2h (lm_head is tied)
    assert gpt.num_params == 4 * (12 * H * H + 13 * H) + (V + S) * H + 2 * H
    assert sum(layer.param_count for layer in gpt.layers) == gpt.num_params
    assert gpt.tied_parameters == [["tok_emb.weight", "lm_head.weight"]]
    assert gpt.model_flops_per_sequence == sum(layer.fwd_flops + layer.bwd_flops for layer in gpt.layers)


def test_gpt_block_flops_match_the_formula(gpt):
    block = layer(gpt, "blocks.0")
    # matmuls 2 * s * (3h^2 + h^2 + 4h^2 + 4h^2) = 24 s h^2; attention QK^T and AV: 2 * 2 s^2 h
    assert block.fwd_flops == 24 * S * H * H + 4 * S * S * H
    # backward: 2x per matmul (input and weight gradients); fused attention recomputes the
    # scores, 5 s^2 h-sized matmuls instead of 2, i.e. 2.5x
    assert block.bwd_flops == 2 * 24 * S * H * H + 2.5 * 4 * S * S * H
    assert block.tp_flops_fraction == 1.0  # every matmul and the attention are split
    head = layer(gpt, "lm_head")
    assert head.fwd_flops == 2 * S * H * V and head.tp_flops_fraction == 1.0
    assert layer(gpt, "ln_f").fwd_flops == 0


def test_fused_attention_flops_and_the_share_a_causal_kernel_runs(gpt):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    from autoplan.analysis.meta_layer import causal_tile_fraction

    block = layer(gpt, "blocks.0")
    assert (block.attention_fwd_flops, block.attention_bwd_flops) == (4 * S * S * H, 2.5 * 4 * S * S * H)
    assert block.attention_run_fraction == 1.0  # 32 tokens: one tile, run whole
    assert causal_tile_fraction(512) == 5 / 8  # 4 tiles a side: 4 + 3 + 2 + 1 of 16
    # Hugging Face's decoders pass their causal mask explicitly when traced; BERT attends both ways
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=256)
    with torch.device("meta"):
        llama = LlamaForCausalLM(LlamaConfig(**small, num_key_value_heads=2, max_position_embeddings=512))
        bert = BertForMaskedLM(BertConfig(**small, max_position_embeddings=512))
    tokens = torch.zeros(1, 512, dtype=torch.long, device="meta")
    for model, share in ((llama, 5 / 8), (bert, 1.0)):
        attention = [lay for lay in profile_model(model, (tokens,), model_name="m").layers if lay.attention_fwd_flops]
        assert [lay.attention_run_fraction for lay in attention] == [share]
        assert attention[0].attention_fwd_flops == 4 * 512 * 512 * 64


def test_gpt_block_saved_bytes_by_hand(gpt):
    block = layer(gpt, "blocks.0")
    sh = S * H
    # Kept by autograd, in elements (Korthikanti et al. 2022 count 34 s h bytes at 16 bits:
    # 16 s h elements plus dropout masks and the 5 a s^2 scores; here dropout p = 0 and fused
    # attention keeps neither scores nor masks):
    #   ln_1 input x, and its mean and rstd      s h + 2 s
    #   c_attn input (ln_1 output)                s h
    #   q, k, v (views of c_attn's output)        3 s h   split
    #   attention output + log-sum-exp            s h + a s   split (c_proj reads the same storage)
    #   ln_2 input (residual sum), mean, rstd      s h + 2 s
    #   c_fc input (ln_2 output)                   s h
    #   GeLU input (c_fc output)                   4 s h   split
    #   mlp.c_proj input (GeLU output)             4 s h   split
    split = 3 * sh + sh + A * S + 4 * sh + 4 * sh
    replicated = sh + 2 * S + sh + sh + 2 * S + sh
    assert block.saved_bytes["none"] == 4 * (split + replicated) == 4 * (16 * sh + 4 * S + A * S)
    assert block.tp_saved_bytes["none"] == 4 * split
    # selective keeps the block input and the saved matmul outputs: c_attn's q|k|v, c_fc's output
    assert block.saved_bytes["selective"] == 4 * (sh + 3 * sh + 4 * sh)
    assert block.tp_saved_bytes["selective"] == 4 * (3 * sh + 4 * sh)
    # full keeps only the block input
    assert block.saved_bytes["full"] == 4 * sh and block.tp_saved_bytes["full"] == 0
    assert block.output_bytes == 4 * sh


def test_gpt_tensor_parallel_collectives_and_parameters(gpt):
    block = layer(gpt, "blocks.0")
    # forward: one all-reduce of the s x h output per rowwise Linear (attn.c_proj, mlp.c_proj)
    assert block.tp_allreduce_bytes_fwd == 2 * 4 * S * H
    # backward: one per colwise group (c_attn reads ln_1's output, c_fc reads ln_2's)
    assert block.tp_allreduce_bytes_bwd == 2 * 4 * S * H
    # split: c_attn 3h^2 + 3h, c_proj weight h^2, c_fc 4h^2 + 4h, mlp.c_proj weight 4h^2
    assert block.tp_param_count == 12 * H * H + 7 * H
    assert block.tp_sites["blocks.0.attn.c_attn"].fused_sizes == [H, H, H]
    tok_emb = layer(gpt, "tok_emb")
    assert tok_emb.tp_allreduce_bytes_fwd == 4 * S * H and tok_emb.tp_param_count == V * H
    assert tok_emb.tp_divisors == {"tok_emb vocab": V}
    head = layer(gpt, "lm_head")
    assert head.param_count == 0 and head.tp_param_count == 0  # tied: counted in tok_emb
    assert head.tp_allreduce_bytes_bwd == 4 * S * H
    # the vocab-split logits are all-gathered: s x V floats, costed as an all-reduce of half
    assert head.tp_allreduce_bytes_fwd == 4 * S * V / 2


def test_repeated_blocks_carry_their_own_names(gpt):
    first, last = layer(gpt, "blocks.0"), layer(gpt, "blocks.3")
    assert first.signature == last.signature and first.saved_bytes == last.saved_bytes
    inner = {path for path in first.tp_sites if path != "blocks.0"}  # blocks.0 itself: the SP entry
    assert set(last.tp_sites) - {"blocks.3"} == {path.replace("blocks.0.", "blocks.3.") for path in inner}
    assert first.tp_sites["blocks.0"].style == "sequence_parallel_entry"
    assert last.tp_sites["blocks.3"].style == "sequence_parallel_exit"  # the last split block gathers
    assert last.tp_divisors == {"blocks.3.attn heads": A, "blocks.3.mlp width": 4 * H}


def test_residual_mlp_block_by_hand():
    job = zoo.build("mlp-tiny", batch_size=4, device="meta")
    profile = profile_model(job.module, job.example_inputs, model_name="mlp-tiny")
    assert profile.seq_len == 1 and profile.global_batch_size == 4
    d = 32
    block = layer(profile, "blocks.0")
    # norm: x, mean, rstd; fc1: norm output; GeLU: fc1 output (4d); fc2: GeLU output (4d)
    assert block.saved_bytes["none"] == 4 * (d + 2 + d + 4 * d + 4 * d)
    assert block.tp_saved_bytes["none"] == 4 * (4 * d + 4 * d)
    assert block.saved_bytes["selective"] == 4 * (d + 4 * d)
    assert block.fwd_flops == 2 * (d * 4 * d + 4 * d * d)
    assert layer(profile, "input").tp_flops_fraction == 0.0


def test_loss_is_profiled_with_the_last_layer():
    job = zoo.build("gpt-tiny", batch_size=4, device="meta")
    with_loss = profile_model(job.module, job.example_inputs, loss_fn=job.loss_fn, targets=job.targets)
    without = profile_model(job.module, job.example_inputs)
    # cross entropy keeps its log-softmax output (s x V floats, split over the vocab) and the
    # targets (s int64 ids)
    head, plain_head = layer(with_loss, "lm_head"), layer(without, "lm_head")
    assert head.saved_bytes["none"] - plain_head.saved_bytes["none"] == 4 * S * V + 8 * S
    assert head.tp_saved_bytes["none"] - plain_head.tp_saved_bytes["none"] == 4 * S * V
    assert layer(with_loss, "blocks.0") == layer(without, "blocks.0")


def test_measure_times_layers_on_a_real_device():
    job = zoo.build("mlp-tiny", batch_size=4, device="cpu")
    profile = profile_model(job.module, job.example_inputs, measure=True, device="cpu")
    assert all(layer.measured_fwd_s > 0 and layer.measured_bwd_s > 0 for layer in profile.layers)
    assert {layer.measured_device for layer in profile.layers} == {"cpu"}
    assert profile.fingerprint == profile_model(job.module, job.example_inputs).fingerprint


@pytest.mark.parametrize("name", ["gpt3-175b", "megatron-1t"])
def test_huge_models_profile_on_meta(name):
    job = zoo.build(name, batch_size=1536, device="meta")
    profile = profile_model(job.module, job.example_inputs, model_name=name)
    assert profile.global_batch_size == 1536 and profile.seq_len == 2048
    assert abs(profile.num_params - job.module.config.num_params) == 0


def test_inputs_without_a_batch_dim_are_rejected():
    with pytest.raises(ValueError, match="example_inputs"):
        profile_model(torch.nn.Linear(2, 2), (torch.tensor(1.0),))


class _NoMetaBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this kernel has no meta backward")


class _Doubler(torch.nn.Module):
    def forward(self, x):
        return _NoMetaBackward.apply(x)


def test_a_layer_failing_on_meta_names_the_layer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), _Doubler())
    with pytest.raises(ValueError, match=r"layer '1' \(_Doubler\).*no meta backward"):
        profile_model(model, (torch.randn(2, 4),))


def test_loss_on_a_repeated_last_block_leaves_its_twins_alone():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    model = torch.nn.Sequential(Block(), Block(), Block())
    profile = profile_model(model, (torch.randn(4, 5, 8),), loss_fn=lambda output, targets: output.pow(2).mean())
    first, last = profile.layers[0], profile.layers[-1]
    assert first.signature == last.signature
    # pow keeps its input: the block output, 5 x 8 floats
    assert last.saved_bytes["none"] - first.saved_bytes["none"] == 4 * 5 * 8


def test_tp_flops_fraction_stops_at_the_colwise_input_gradient():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = torch.nn.Linear(8, 8)  # feeds the residual stream: not split
            self.up, self.down = torch.nn.Linear(8, 32), torch.nn.Linear(32, 8)

        def forward(self, x):
            x = self.pre(x)
            return x + self.down(torch.relu(self.up(x)))

    block = profile_model(torch.nn.Sequential(Block()), (torch.randn(4, 5, 8),)).layers[0]
    pre, up, down = 2 * 5 * 8 * 8, 2 * 5 * 8 * 32, 2 * 5 * 32 * 8  # forward FLOPs of 5 tokens
    assert block.fwd_flops == pre + up + down and block.bwd_flops == 2 * (pre + up + down)
    # split: up and down, forward and backward; pre's backward reads the all-reduced gradient
    assert block.tp_flops_fraction == pytest.approx(3 * (up + down) / (3 * (pre + up + down)))


def test_ops_counted_on_meta_are_the_ops_a_real_run_dispatches():
    """The roofline charges the host's per-op work (`DeviceSpec.op_overhead_us`) by these counts:
    a gpt-tiny block run for real on the CPU, forward then backward, dispatches as many aten ops."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += func is not torch.ops.aten.detach.default  # as the profile counts
            return func(*args, **(kwargs or {}))

    job = zoo.build("gpt-tiny", batch_size=4, device="meta")
    profile = profile_model(job.module, job.example_inputs, model_name="gpt-tiny")
    block = layer(profile, "blocks.0")
    real = zoo.build("gpt-tiny", batch_size=1, device="cpu").module.blocks[0]
    x = torch.randn(1, S, H, requires_grad=True)
    with Count() as forward:
        out = real(x)
    with Count() as backward:
        out.backward(torch.ones_like(out))
    assert block.backward_ops == backward.ops
    # on meta, attention runs the efficient kernel (two views more) where the CPU runs flash
    assert abs(block.forward_ops - forward.ops) <= 0.1 * forward.ops
    assert 0 < block.forward_ops < block.backward_ops
    # per layer, not per sequence: a bigger batch dispatches the same ops
    assert layer(gpt_profile_of_batch(8), "blocks.0").forward_ops == block.forward_ops


def gpt_profile_of_batch(batch_size: int):
    job = zoo.build("gpt-tiny", batch_size=batch_size, device="meta")
    return profile_model(job.module, job.example_inputs, model_name="gpt-tiny")


HF_CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"


@pytest.mark.parametrize("config", ["llama.json", "gpt2.json"])
def test_ops_counted_on_meta_match_a_real_run_of_a_hugging_face_decoder_layer(config):
    """As above, for a Hugging Face decoder layer (rotary or learned positions, its own
    attention module) built from a tiny config and run as the profile calls it."""
    pytest.importorskip("transformers")
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map_only

    from autoplan.analysis.measured_layer import _materialize, _real_state
    from autoplan.analysis.meta_layer import _layer_inputs
    from autoplan.analysis.trace import _tensors, trace_model

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += func is not torch.ops.aten.detach.default  # as the profile counts
            return func(*args, **(kwargs or {}))

    job = zoo.build(f"hf:{HF_CONFIGS / config}", batch_size=2, seq_len=16, device="meta")
    profile = profile_model(job.module, job.example_inputs, model_name=config)
    traced = trace_model(job.module, tuple(x[:1] for x in job.example_inputs))
    block = next(layer for layer in profile.layers if layer.name.endswith(".0"))
    cpu = torch.device("cpu")
    state = _real_state(traced, block.name, cpu, None)
    args, kwargs = tree_map_only(torch.Tensor, lambda t: _materialize(t, cpu), _layer_inputs(traced, block.name))
    with Count() as forward:
        out = torch.func.functional_call(traced.module.get_submodule(block.name), state, args, kwargs)
    roots = [t for t in _tensors(out) if t.requires_grad]
    with Count() as backward:
        torch.autograd.backward(roots, [torch.ones_like(t) for t in roots])
    assert block.backward_ops == backward.ops
    assert abs(block.forward_ops - forward.ops) <= 0.1 * forward.ops
    assert 0 < block.forward_ops < block.backward_ops
