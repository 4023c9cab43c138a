"""trace_model: layers in execution order, repeated blocks, tensor-parallel sites from dataflow."""

import pytest
import torch
import torch.nn as nn

from autoplan import zoo
from autoplan.analysis.trace import trace_model
from autoplan.schema.plan import TPSite

COLWISE, ROWWISE = TPSite(style="colwise"), TPSite(style="rowwise")
SEQUENCE_PARALLEL = TPSite(style="sequence_parallel")


def traced(name: str):
    job = zoo.build(name, batch_size=4, device="meta")
    return trace_model(job.module, job.example_inputs)


def sites_under(traced_model, prefix: str) -> dict[str, TPSite]:
    return {path: site for path, site in traced_model.tp_sites.items() if path.startswith(prefix)}


def test_layers_follow_execution_order():
    assert traced("gpt-tiny").layers == [
        "tok_emb",
        "pos_emb",
        "drop",
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3",
        "ln_f",
        "lm_head",
    ]
    assert traced("llama-tiny").layers == [
        "tok_embeddings",
        "layers.0",
        "layers.1",
        "layers.2",
        "layers.3",
        "norm",
        "output",
    ]
    assert traced("mlp-tiny").layers == ["input", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]


def test_order_comes_from_running_not_from_registration():
    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)  # registered first, runs last
            self.body = nn.Linear(4, 8)

        def forward(self, x):
            return self.head(self.body(x))

    assert trace_model(Backwards(), (torch.randn(3, 4),)).layers == ["body", "head"]


def test_trunk_modules_are_expanded_like_hugging_face_model_model():
    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

        def forward(self, tokens):
            x = self.embed(tokens)
            for layer in self.layers:
                x = layer(x)
            return x

    class ForCausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Trunk()
            self.lm_head = nn.Linear(8, 10)

        def forward(self, tokens):
            return self.lm_head(self.model(tokens))

    layers = trace_model(ForCausalLM(), (torch.zeros(2, 5, dtype=torch.long),)).layers
    assert layers == ["model.embed", "model.layers.0", "model.layers.1", "lm_head"]


def test_repeated_blocks_share_a_signature_and_other_layers_do_not():
    gpt = traced("gpt-tiny")
    assert len({gpt.signatures[f"blocks.{i}"] for i in range(4)}) == 1
    assert len(set(gpt.signatures.values())) == len(gpt.layers) - 3  # 4 blocks, one signature
    assert gpt.signatures["tok_emb"] != gpt.signatures["lm_head"]
    assert gpt.representative("blocks.3") == "blocks.0"


def test_signature_depends_on_shapes():
    small = trace_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), (torch.randn(2, 4),))
    assert small.signatures["0"] == small.signatures["1"]
    wide = trace_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 6)), (torch.randn(2, 4),))
    assert wide.signatures["0"] != wide.signatures["1"]


def test_gpt_fused_qkv_mlp_vocab_and_sequence_parallel_sites():
    gpt = traced("gpt-tiny")
    assert sites_under(gpt, "blocks.0.") == {
        "blocks.0.attn.c_attn": TPSite(style="colwise", fused_sizes=[64, 64, 64]),  # q | k | v, h = 64 each
        "blocks.0.attn.c_proj": ROWWISE,
        "blocks.0.mlp.c_fc": COLWISE,
        "blocks.0.mlp.c_proj": ROWWISE,
        "blocks.0.ln_1": SEQUENCE_PARALLEL,
        "blocks.0.ln_2": SEQUENCE_PARALLEL,
        "blocks.0.drop": SEQUENCE_PARALLEL,
        # q|k|v and the MLP read their parent's input only: it is laid out once per group
        "blocks.0.attn": TPSite(style="colwise_input", input_key=0, num_positional=1),
        "blocks.0.mlp": TPSite(style="colwise_input", input_key=0, num_positional=1),
    }
    # the stream is split along the sequence from block 0's input to block 3's output
    assert gpt.tp_sites["blocks.0"] == TPSite(style="sequence_parallel_entry", input_key=0, num_positional=1)
    assert gpt.tp_sites["blocks.3"] == TPSite(style="sequence_parallel_exit", input_key=0, num_positional=1)
    assert gpt.tp_sites["tok_emb"] == TPSite(style="vocab_embedding")
    assert gpt.tp_sites["lm_head"] == TPSite(style="vocab_output")
    assert "pos_emb" not in gpt.tp_sites  # indexed by positions, not by the model's tokens
    assert "ln_f" not in gpt.tp_sites and "drop" not in gpt.tp_sites  # outside the split region
    # 4 heads of 16 dims; MLP width 4 * 64; vocab 128
    assert gpt.tp_divisors["blocks.0.attn heads"] == 4
    assert gpt.tp_divisors["blocks.3.mlp width"] == 256
    assert gpt.tp_divisors["tok_emb vocab"] == 128 and gpt.tp_divisors["lm_head vocab"] == 128
    assert gpt.tp_divide_attrs == {}  # heads come from tensor widths: view(B, T, -1, head_dim)
    assert gpt.tied_parameters == [["tok_emb.weight", "lm_head.weight"]]


def test_llama_grouped_query_attention_and_swiglu():
    llama = traced("llama-tiny")
    assert {path: site.style for path, site in sites_under(llama, "layers.2.").items()} == {
        "layers.2.attention.wq": "colwise",
        "layers.2.attention.wk": "colwise",
        "layers.2.attention.wv": "colwise",
        "layers.2.attention.wo": "rowwise",
        "layers.2.feed_forward.w1": "colwise",
        "layers.2.feed_forward.w3": "colwise",
        "layers.2.feed_forward.w2": "rowwise",
        "layers.2.attention_norm": "sequence_parallel",
        "layers.2.ffn_norm": "sequence_parallel",
        "layers.2.attention": "colwise_input",
        "layers.2.feed_forward": "colwise_input",
    }
    # hidden 64 / 4 heads = head_dim 16; wk, wv: 2 kv heads * 16 = 32 features
    assert llama.tp_divisors["layers.2.attention heads"] == 4
    assert llama.tp_divisors["layers.2.attention kv_heads"] == 2
    assert llama.tp_divisors["layers.2.feed_forward width"] == 128
    assert llama.tp_sites["output"].style == "vocab_output"
    assert llama.tied_parameters == []


def test_residual_mlp_splits_its_blocks_only():
    mlp = traced("mlp-tiny")
    assert mlp.tp_sites["blocks.1.fc1"] == COLWISE and mlp.tp_sites["blocks.1.fc2"] == ROWWISE
    # the input and head Linears feed the residual stream / the output: nothing closes a region
    assert "input" not in mlp.tp_sites and "head" not in mlp.tp_sites
    # a norm on (batch, features) has no sequence dim to split
    assert "blocks.1.norm" not in mlp.tp_sites
    assert mlp.tp_divisors["blocks.1 width"] == 128


def test_a_norm_between_linears_breaks_the_region():
    class NormInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.norm, self.down = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 8)

        def forward(self, x):
            return x + self.down(self.norm(self.up(x)))

    result = trace_model(nn.Sequential(NormInside()), (torch.randn(2, 3, 8),))
    assert result.tp_sites == {}


class HFStyleAttention(nn.Module):
    """Hugging Face style: head counts live in attributes and are written into view()."""

    def __init__(self, hidden: int = 64, num_heads: int = 4, num_key_value_heads: int = 2):
        super().__init__()
        self.hidden_size, self.num_heads, self.head_dim = hidden, num_heads, hidden // num_heads
        self.num_key_value_heads = num_key_value_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        bsz, q_len, _ = x.size()
        q = self.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, q_len, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        k, v = (t.repeat_interleave(self.num_heads // self.num_key_value_heads, dim=1) for t in (k, v))
        scores = torch.matmul(q, k.transpose(2, 3)) / self.head_dim**0.5
        y = torch.matmul(scores.softmax(dim=-1), v)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, q_len, self.hidden_size))


class HFStyleLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(64)
        self.self_attn = HFStyleAttention()

    def forward(self, x):
        return x + self.self_attn(self.input_layernorm(x))


def test_hugging_face_style_attributes_are_divided():
    result = trace_model(nn.Sequential(HFStyleLayer(), HFStyleLayer()), (torch.randn(2, 8, 64),))
    assert result.tp_sites["0.self_attn.k_proj"] == COLWISE
    assert result.tp_sites["1.self_attn.o_proj"] == ROWWISE
    assert result.tp_divisors["0.self_attn heads"] == 4 and result.tp_divisors["0.self_attn kv_heads"] == 2
    # num_heads and num_key_value_heads are written into view(); hidden_size into reshape();
    # head_dim (16) is per head and stays; the integer division for repeats is not an attribute
    assert result.tp_divide_attrs == {
        "0.self_attn.num_heads": 4,
        "0.self_attn.num_key_value_heads": 2,
        "0.self_attn.hidden_size": 64,
        "1.self_attn.num_heads": 4,
        "1.self_attn.num_key_value_heads": 2,
        "1.self_attn.hidden_size": 64,
    }


def test_a_model_on_cpu_is_traced_on_meta_copies():
    job = zoo.build("gpt-tiny", batch_size=2, device="cpu")
    result = trace_model(job.module, job.example_inputs)
    assert result.layers == traced("gpt-tiny").layers
    assert all(t.is_meta for t in result.meta_state.values())
    assert all(p.device.type == "cpu" for p in job.module.parameters())
    assert result.meta_state["tok_emb.weight"] is result.meta_state["lm_head.weight"]


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # needs the values, which meta tensors do not have
            return self.fc(x)
        return x


def test_untraceable_model_names_module_and_operation():
    with pytest.raises(ValueError, match=r"module '1' \(DataDependent\).*'__bool__'"):
        trace_model(nn.Sequential(nn.Linear(4, 4), DataDependent()), (torch.randn(2, 4),))

    class Nonzero(nn.Module):
        def forward(self, x):
            return torch.nonzero(x)

    with pytest.raises(ValueError, match=r"module 'body' \(Nonzero\).*'nonzero'"):
        trace_model(_Wrap(Nonzero()), (torch.randn(2, 4),))


class _Wrap(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def test_graph_nodes_name_their_owning_module():
    gpt = traced("gpt-tiny")
    attention = [node for node in gpt.graph if node.target == "scaled_dot_product_attention"]
    assert [node.module for node in attention] == ["blocks.0.attn"]  # blocks 1-3 replay block 0
    linear = next(node for node in gpt.graph if node.module == "blocks.0.mlp.c_fc")
    assert linear.is_module and linear.layer == "blocks.0" and tuple(linear.outputs[0].shape) == (4, 32, 256)


def test_split_qkv_with_matmul_attention_and_properties():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.qkv(x).split(32, dim=-1)
            q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in (q, k, v))
            weights = (q @ k.mT).softmax(-1)  # softmax over keys, not heads
            return x + self.out((weights @ v).transpose(1, 2).flatten(2))

    result = trace_model(nn.Sequential(Attention()), (torch.randn(2, 6, 32),))
    assert result.tp_sites == {"0.qkv": TPSite(style="colwise", fused_sizes=[32, 32, 32]), "0.out": ROWWISE}
    assert result.tp_divisors == {"0 heads": 4}
