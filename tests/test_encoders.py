"""Encoders load from safetensors only, refuse pickles and remote code, and know their family."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoTokenizer, BertModel, CLIPModel  # noqa: E402

from pipeline.encode.models import (  # noqa: E402
    check_model_dir,
    embedding_table_size,
    family_of,
    final_norm,
    load_encoder,
    position_limit,
    resolve_model_dir,
)
from pipeline.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    builders = {
        "bert": tiny_models.build_tiny_bert, "clip": tiny_models.build_tiny_clip_text,
        "clip_full": tiny_models.build_tiny_clip_full, "gpt2": tiny_models.build_tiny_gpt2,
        "pickle": tiny_models.build_pickle_only, "remote": tiny_models.build_remote_code,
    }
    return {name: str(build(root / name)) for name, build in builders.items()}


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_alias_and_directories_resolve(built):
    minilm = resolve_model_dir("minilm")
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()
    assert str(resolve_model_dir(built["bert"])) == built["bert"]
    with pytest.raises(ConfigError, match="neither an alias"):
        resolve_model_dir("no-such-model")


@pytest.mark.parametrize("name,cls,norm", [
    ("bert", "BertModel", None), ("clip", "CLIPTextModel", "final_layer_norm"), ("gpt2", "GPT2Model", "ln_f"),
])
def test_each_family_loads_for_inference(built, name, cls, norm):
    model = load_encoder(built[name])
    assert type(model).__name__ == cls
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert family_of(model).name == name
    assert (final_norm(model) is None) == (norm is None)
    assert embedding_table_size(model) == len(AutoTokenizer.from_pretrained(built[name]))
    assert position_limit(model) == {"bert": 64, "clip": 77, "gpt2": 64}[name]


def test_a_whole_clip_checkpoint_loads_its_text_model(built):
    text = load_encoder(built["clip_full"])
    assert type(text).__name__ == "CLIPTextModel"
    full = CLIPModel.from_pretrained(built["clip_full"]).eval()
    ids = torch.tensor([[0, 17, 42, 99, 1]])
    with torch.inference_mode():
        torch.testing.assert_close(text(ids).last_hidden_state, full.text_model(ids).last_hidden_state,
                                   rtol=0, atol=0)


def test_dtype_and_device(built):
    model = load_encoder(built["bert"], dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_pickle_only_checkpoints_are_refused_unless_allowed(built):
    with pytest.raises(ConfigError, match=r"pickle checkpoints \(pytorch_model.bin\).*allow_pickle: true"):
        load_encoder(built["pickle"])
    with pytest.raises(ConfigError, match="allow_pickle"):
        check_model_dir(built["pickle"])  # the same check, without loading anything
    assert check_model_dir(built["pickle"], allow_pickle=True)["model_type"] == "bert"
    model = load_encoder(built["pickle"], allow_pickle=True)
    reference = load_encoder(built["bert"])  # the same seed: the same weights
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


def test_remote_code_is_refused_unless_trusted(built):
    with pytest.raises(ConfigError, match="remote code.*trust_remote_code: true"):
        load_encoder(built["remote"])
    with pytest.raises(ConfigError, match="trust_remote_code"):
        check_model_dir(built["remote"])
    # Trusted, it loads, but as the built-in class of its model type: no code from the directory runs.
    assert type(load_encoder(built["remote"], trust_remote_code=True)) is BertModel


def test_unsupported_model_type_is_refused(built, tmp_path):
    model_dir = _copy(built["bert"], tmp_path / "roberta")
    config = json.loads((tmp_path / "roberta" / "config.json").read_text())
    (tmp_path / "roberta" / "config.json").write_text(json.dumps(config | {"model_type": "roberta"}))
    with pytest.raises(ConfigError, match="'roberta'.*supported model types: bert"):
        load_encoder(model_dir)


def test_missing_weights_are_refused(built, tmp_path):
    model_dir = _copy(built["bert"], tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    dropped = next(k for k in weights if "encoder.layer.1" in k)
    del weights[dropped]
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="lacks 1 weights"):
        load_encoder(model_dir)


def test_directories_without_config_or_weights_are_refused(built, tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_encoder(tmp_path)
    model_dir = _copy(built["bert"], tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="holds no weights"):
        load_encoder(model_dir)


def test_eager_attention_when_the_class_has_no_sdpa(built, monkeypatch):
    monkeypatch.setattr(BertModel, "_supports_sdpa", False)
    assert load_encoder(built["bert"]).config._attn_implementation == "eager"
