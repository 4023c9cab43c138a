"""`hf:PATH` models: a Hugging Face config.json (or a folder holding one) built on meta by
`autoplan.zoo.build`, its mistakes named by file and field, and `autoplan plan --model hf:...`
(in-process, through the CLI's entry point, as tests/unit/test_cli.py runs it)."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import pytest

from autoplan import Plan, zoo
from autoplan.cli import main

transformers = pytest.importorskip("transformers")

CONFIGS = Path(__file__).resolve().parents[1] / "models" / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.json"))


def test_the_tiny_configs_are_there():
    assert len(CONFIG_FILES) >= 5


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.stem for p in CONFIG_FILES])
def test_every_tiny_config_builds_on_meta_as_its_architecture(path):
    fields = json.loads(path.read_text())
    job = zoo.build(f"hf:{path}", batch_size=2, device="meta")
    assert type(job.module).__name__ == fields["architectures"][0]
    assert job.module.config.model_type == fields["model_type"]
    assert job.module.training and job.module.config.use_cache is False
    params = list(job.module.parameters())
    assert params and all(p.device.type == "meta" and p.dtype.is_floating_point for p in params)
    tokens = job.example_inputs[0]
    assert tokens.device.type == "meta" and tokens.shape[0] == 2
    assert job.targets is not None and job.targets.shape == tokens.shape
    assert len(job.example_inputs) == (3 if job.module.config.is_encoder_decoder else 1)


def test_seq_len_defaults_to_the_configs_positions_and_is_checked():
    llama = CONFIGS / "llama.json"
    positions = json.loads(llama.read_text())["max_position_embeddings"]
    assert zoo.build(f"hf:{llama}", batch_size=1).example_inputs[0].shape == (1, positions)
    assert zoo.build(f"hf:{llama}", batch_size=1, seq_len=8).example_inputs[0].shape == (1, 8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        zoo.build(f"hf:{llama}", batch_size=1, seq_len=positions + 1)


def test_a_folder_holding_config_json_works(tmp_path):
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    shutil.copy(CONFIGS / "llama.json", folder / "config.json")
    job = zoo.build(f"hf:{folder}", batch_size=2)
    assert type(job.module).__name__ == "LlamaForCausalLM"


def test_without_architectures_the_causal_lm_is_chosen(tmp_path):
    fields = json.loads((CONFIGS / "llama.json").read_text())
    del fields["architectures"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    assert type(zoo.build(f"hf:{path}", batch_size=1).module).__name__ == "LlamaForCausalLM"


def _write(tmp_path: Path, text: str, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _llama_with(**changes) -> str:
    fields = json.loads((CONFIGS / "llama.json").read_text())
    fields.update(changes)
    return json.dumps({k: v for k, v in fields.items() if v is not None})


@pytest.mark.parametrize(
    "case, text, words",
    [
        ("malformed JSON", '{"model_type": "llama",', ["not valid JSON"]),
        ("not an object", "[1, 2]", ["JSON object"]),
        ("missing model_type", _llama_with(model_type=None), ["'model_type'", "missing"]),
        ("unknown model_type", _llama_with(model_type="no-such-family"), ["'model_type'", "'no-such-family'"]),
        (
            "unknown architectures name",
            _llama_with(architectures=["LlamaForTeleportation"]),
            ["'architectures'", "'LlamaForTeleportation'"],
        ),
        (
            "architectures of another family",
            _llama_with(architectures=["GPT2LMHeadModel"]),
            ["'architectures'", "'GPT2LMHeadModel'", "'model_type'"],
        ),
        ("field of the wrong type", _llama_with(hidden_size="wide"), ["hidden_size"]),
    ],
)
def test_bad_configs_raise_a_value_error_naming_file_and_field(tmp_path, case, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        zoo.build(f"hf:{path}", batch_size=1)
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    for word in words:
        assert word in message, (case, message)


def test_missing_file_and_empty_folder_are_named(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match="missing.json: no such file"):
        zoo.build(f"hf:{missing}", batch_size=1)
    with pytest.raises(ValueError, match="holds no config.json"):
        zoo.build(f"hf:{tmp_path}", batch_size=1)


def test_cli_plans_an_hf_model(tmp_path, capsys):
    out = tmp_path / "plan.json"
    gc_state = (gc.get_threshold(), gc.get_freeze_count())
    assert main(["plan", "--model", f"hf:{CONFIGS / 'llama.json'}", "--cluster", "local:2", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "mesh" in printed.out and "Traceback" not in printed.err
    assert Plan.from_json(out).model_name == f"hf:{CONFIGS / 'llama.json'}"
    # called with a list, main leaves the process alone (no gc tuning, no hard exit)
    assert (gc.get_threshold(), gc.get_freeze_count()) == gc_state


@pytest.mark.parametrize(
    "text",
    ['{"model_type": "llama",', _llama_with(hidden_size="wide"), _llama_with(architectures=["LlamaForTeleportation"])],
)
def test_cli_prints_a_bad_hf_config_as_one_line_and_exits_2(tmp_path, capsys, text):
    path = _write(tmp_path, text)
    assert main(["plan", "--model", f"hf:{path}", "--cluster", "local:2"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("autoplan:")]
    assert len(lines) == 1 and lines[0].startswith("autoplan: error:") and str(path) in lines[0]
    assert "Traceback" not in err


def test_cli_model_help_mentions_hf(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--help"])
    assert exit_info.value.code == 0
    assert "hf:PATH" in capsys.readouterr().out.replace("\n", " ")
