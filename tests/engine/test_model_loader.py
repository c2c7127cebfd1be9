"""splitserve.engine.model_loader: resolving --model, configs, weights and tokenizers.

The default model's GGUF is checked tensor by tensor against what transformers builds from the
same file; tiny random models (saved with save_pretrained, or written to GGUF the way
llama.cpp's converter does) check the directory path, the q/k permutation and the
architectures the default model does not cover.
"""

from __future__ import annotations

import json
import math
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from splitserve.engine.config import SUPPORTED_ARCHITECTURES  # noqa: E402
from splitserve.engine.errors import ModelSpecError  # noqa: E402
from splitserve.engine.model_loader import (  # noqa: E402
    ModelSource,
    default_model_path,
    expected_parameter_names,
    load_model,
    load_model_config,
    load_state_dict,
    load_tokenizer,
    resolve_model,
)
from splitserve.engine.model_loader.gguf_header import read_gguf_header  # noqa: E402
from splitserve.engine.model_loader.gguf_weights import tensor_arrays  # noqa: E402

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


# ---------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def default_source() -> ModelSource:
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def default_state_dict(default_source):
    return load_state_dict(default_source, torch.float32, progress=False)


@pytest.fixture(scope="module")
def default_reader(default_source) -> gguf.GGUFReader:
    return gguf.GGUFReader(str(default_source.path))


@pytest.fixture(scope="module")
def transformers_gguf_model(default_source):
    from transformers import AutoModelForCausalLM

    path = default_source.path
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model


@pytest.fixture(scope="module")
def default_tokenizer(default_source):
    return load_tokenizer(default_source)


def _tiny_model(kind: str, seed: int = 0, **overrides):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    model = model_cls(config_cls(**{**TINY, **overrides})).eval()
    # random init leaves norms at exactly 1.0 and biases at 0: make every tensor distinctive
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items() if "rotary_emb" not in k}
    if model.config.tie_word_embeddings:
        assert torch.equal(sd.pop("lm_head.weight"), sd["model.embed_tokens.weight"])
    return sd


def _assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype, name
        assert ours[name].is_contiguous(), name
        assert torch.equal(ours[name], t), name


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_LEAVES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    leaf, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_LEAVES[leaf]}.{suffix}"


def _write_gguf(path: pathlib.Path, arch: str, model, *, f16: bool = False, name: str = "tiny",
                rope_freqs: np.ndarray | None = None) -> pathlib.Path:
    """Write `model` as llama.cpp's converter would (names, q/k permutation for `llama`)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    if arch == "qwen3":
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_eot_token_id(5)
    for hf, t in _hf_state_dict(model).items():
        a = t.float().numpy()
        if arch == "llama" and ".q_proj." in hf:
            a = _llama_cpp_permute(a, c.num_attention_heads, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in hf:
            a = _llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        if f16 and a.ndim == 2:
            a = a.astype(np.float16)
        w.add_tensor(_gguf_name(hf), np.ascontiguousarray(a))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _llama3_rope_freqs(head_dim, base, factor, low=1.0, high=4.0, old_ctx=8192) -> np.ndarray:
    """llama.cpp's converter: the rope_freqs tensor of a llama3 rope_scaling."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def _assert_spec_error_names_forms(excinfo) -> str:
    msg = str(excinfo.value)
    assert "smollm2-135m" in msg and ".gguf" in msg and "config.json" in msg, msg
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in msg, msg
    return msg


# ---------------------------------------------------------------- default model (GGUF)


def test_resolve_alias(default_source):
    assert default_source.kind == "gguf"
    assert default_source.name == "smollm2-135m"
    assert default_source.path == default_model_path()
    assert default_source.path.is_file() and default_source.path.suffix == ".gguf"
    direct = resolve_model(str(default_source.path))
    assert direct == ModelSource("gguf", default_source.path, default_source.path.stem)


def test_gguf_config_matches_transformers(default_source, transformers_gguf_model):
    cfg = load_model_config(default_source)
    hf = transformers_gguf_model.config
    assert cfg.architecture == type(transformers_gguf_model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == hf.vocab_size
    assert cfg.hidden_size == hf.hidden_size
    assert cfg.intermediate_size == hf.intermediate_size
    assert cfg.num_layers == hf.num_hidden_layers
    assert cfg.num_heads == hf.num_attention_heads
    assert cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.head_dim == hf.head_dim == 64
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.rope_scaling is None and hf.rope_parameters["rope_type"] == "default"
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.tie_word_embeddings is hf.tie_word_embeddings is True
    assert not cfg.attention_bias and not cfg.qk_norm
    assert cfg.bos_token_id == hf.bos_token_id
    assert cfg.eos_token_ids == (hf.eos_token_id,) == (2,)


def test_gguf_state_dict_equals_transformers(default_source, default_state_dict, transformers_gguf_model):
    cfg = load_model_config(default_source)
    theirs = {k: v.detach() for k, v in transformers_gguf_model.state_dict().items() if "rotary" not in k}
    # transformers ties lm_head to the embedding; we return it only when untied
    assert torch.equal(theirs.pop("lm_head.weight"), theirs["model.embed_tokens.weight"])
    assert list(default_state_dict) == expected_parameter_names(cfg)
    _assert_same_tensors(default_state_dict, theirs)


def test_load_model_is_config_and_weights_from_one_header_parse(default_source, monkeypatch):
    """What an Engine loads: the config `load_model_config` gives and every parameter the
    config names, the GGUF header read once (load_state_dict is this call's weights, so
    test_gguf_state_dict_equals_transformers checks their values)."""
    from splitserve.engine.model_loader import loader

    reads = []
    real = loader.read_gguf_header
    monkeypatch.setattr(loader, "read_gguf_header",
                        lambda *a, **k: reads.append(a) or real(*a, **k))
    cfg, sd = load_model(default_source, torch.float32, progress=False)
    assert len(reads) == 1
    assert cfg == load_model_config(default_source)
    assert set(sd) == set(expected_parameter_names(cfg))


def test_gguf_q_k_are_unpermuted(default_reader, default_state_dict):
    """The raw dequantized q/k differ from ours exactly by llama.cpp's permutation."""
    tensors = {t.name: t for t in default_reader.tensors if t.name in ("blk.3.attn_q.weight", "blk.3.attn_k.weight")}
    for gname, hname, kv in (("blk.3.attn_q.weight", "q_proj", 9), ("blk.3.attn_k.weight", "k_proj", 3)):
        t = tensors[gname]
        raw = gguf.quants.dequantize(t.data, t.tensor_type)
        ours = default_state_dict[f"model.layers.3.self_attn.{hname}.weight"].numpy()
        assert not np.array_equal(raw, ours)
        assert np.array_equal(_llama_cpp_permute(ours, 9, kv), raw)


def test_gguf_header_reader_matches_gguf_reader(default_source, default_reader):
    reader = default_reader
    header = read_gguf_header(default_source.path, string_arrays=("tokenizer.ggml.tokens",))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if key in header.metadata:
            assert header.metadata[key] == value, key
        else:  # skipped string array
            assert header.array_lengths[key] == len(value), key
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 49152
    assert list(header.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.ggml_type == t.tensor_type
        assert header.data_start + info.offset == t.data_offset


def test_tensor_arrays_equal_gguf_reader_data(default_source, default_reader):
    """Our tensor views (the loader's, without GGUFReader's seconds of metadata views): the
    same types, shapes, dtypes and bytes as gguf.GGUFReader's for every tensor (Q4_1, Q8_0
    and float32 ones in the default file)."""
    header = read_gguf_header(default_source.path)
    ours = list(tensor_arrays(header))
    assert [info.name for info, _, _ in ours] == [t.name for t in default_reader.tensors]
    types = set()
    for (info, qtype, data), t in zip(ours, default_reader.tensors):
        assert qtype == t.tensor_type and data.dtype == t.data.dtype, t.name
        assert data.shape == t.data.shape, t.name
        assert np.array_equal(data, t.data), t.name
        types.add(qtype.name)
    assert {"Q4_1", "Q8_0", "F32"} <= types


def test_a_truncated_or_twice_named_gguf_is_a_model_spec_error(tmp_path):
    model = _tiny_model("llama", tie_word_embeddings=True)
    path = _write_gguf(tmp_path / "ok.gguf", "llama", model)
    blob = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(blob[:-64])
    source = resolve_model(str(cut))
    with pytest.raises(ModelSpecError, match="does not fit the file"):
        load_state_dict(source, progress=False)
    # two tensors of one name (the writer refuses to write them: rename one in place)
    twice = tmp_path / "twice.gguf"
    assert blob.count(b"blk.0.attn_k.weight") == 1
    twice.write_bytes(blob.replace(b"blk.0.attn_k.weight", b"blk.0.attn_q.weight"))
    with pytest.raises(ModelSpecError, match="two tensors named 'blk.0.attn_q.weight'"):
        load_state_dict(resolve_model(str(twice)), progress=False)


# ---------------------------------------------------------------- synthetic GGUF files


@pytest.mark.parametrize(
    "kind,overrides,f16",
    [
        ("llama", dict(tie_word_embeddings=False), False),
        ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4), True),
        ("qwen2", dict(tie_word_embeddings=True), True),
        ("qwen3", dict(tie_word_embeddings=False, head_dim=32), False),
    ],
)
def test_synthetic_gguf_round_trip(tmp_path, kind, overrides, f16):
    model = _tiny_model(kind, **overrides)
    path = _write_gguf(tmp_path / f"tiny-{kind}.gguf", kind, model, f16=f16)
    source = resolve_model(str(path))
    assert source == ModelSource("gguf", path.resolve(), f"tiny-{kind}")
    cfg = load_model_config(source)
    hc = model.config
    assert cfg.architecture == type(model).__name__
    assert cfg.tie_word_embeddings == hc.tie_word_embeddings
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.qk_norm == (kind == "qwen3")
    head_dim = getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        hc.num_attention_heads, hc.num_key_value_heads, head_dim)
    assert cfg.max_position_embeddings == hc.max_position_embeddings
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2, 5)
    expected = _hf_state_dict(model)
    if f16:
        expected = {k: v.half().float() if v.ndim == 2 else v for k, v in expected.items()}
    sd = load_state_dict(source, progress=False)
    assert list(sd) == expected_parameter_names(cfg)
    _assert_same_tensors(sd, expected)

    sd16 = load_state_dict(source, torch.bfloat16, progress=True)  # the bar goes to stderr
    assert list(sd16) == list(sd)
    for name, t in sd16.items():
        assert t.dtype == torch.bfloat16 and t.is_contiguous()
        assert torch.equal(t, sd[name].to(torch.bfloat16)), name


def test_synthetic_gguf_mistral_name(tmp_path):
    model = _tiny_model("llama")
    path = _write_gguf(tmp_path / "m.gguf", "llama", model, name="Mistral 7B Instruct")
    assert load_model_config(resolve_model(str(path))).architecture == "MistralForCausalLM"


def test_gguf_llama3_rope_freqs(tmp_path):
    model = _tiny_model("llama", rope_theta=500000.0)
    freqs = _llama3_rope_freqs(model.config.head_dim, 500000.0, 8.0)
    assert 1.0 < freqs[4] < 8.0  # the smooth band is exercised
    path = _write_gguf(tmp_path / "l3.gguf", "llama", model, rope_freqs=freqs)
    cfg = load_model_config(resolve_model(str(path)))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    sd = load_state_dict(resolve_model(str(path)), progress=False)
    assert "rope_freqs.weight" not in sd and len(sd) == len(_hf_state_dict(model))

    bad = _write_gguf(tmp_path / "bad.gguf", "llama", model, rope_freqs=freqs[::-1].copy())
    with pytest.raises(ModelSpecError, match="rope_freqs"):
        load_model_config(resolve_model(str(bad)))


# ---------------------------------------------------------------- HF directories


@pytest.mark.parametrize(
    "kind,overrides,shard",
    [
        ("llama", dict(tie_word_embeddings=False, eos_token_id=[3, 4], bos_token_id=1), None),
        ("llama", dict(tie_word_embeddings=True, eos_token_id=3), "60KB"),
        ("qwen2", dict(tie_word_embeddings=True, eos_token_id=2), None),
        ("qwen3", dict(tie_word_embeddings=False, head_dim=32), "60KB"),
    ],
)
def test_hf_dir(tmp_path, kind, overrides, shard):
    model = _tiny_model(kind, **overrides)
    d = tmp_path / f"tiny-{kind}"
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert (d / "model.safetensors.index.json").is_file()
        assert len(list(d.glob("*.safetensors"))) > 1
    source = resolve_model(str(d))
    assert source == ModelSource("hf_dir", d.resolve(), f"tiny-{kind}")
    cfg = load_model_config(source)
    hc = model.config
    assert cfg.architecture == type(model).__name__
    assert cfg.vocab_size == hc.vocab_size
    assert cfg.hidden_size == hc.hidden_size
    assert cfg.intermediate_size == hc.intermediate_size
    assert cfg.num_layers == hc.num_hidden_layers
    assert cfg.num_heads == hc.num_attention_heads
    assert cfg.num_kv_heads == hc.num_key_value_heads
    assert cfg.head_dim == (getattr(hc, "head_dim", None) or hc.hidden_size // hc.num_attention_heads)
    assert cfg.rms_norm_eps == hc.rms_norm_eps
    assert cfg.rope_theta == hc.rope_parameters["rope_theta"]
    assert cfg.rope_scaling is None
    assert cfg.max_position_embeddings == hc.max_position_embeddings
    assert cfg.tie_word_embeddings == hc.tie_word_embeddings
    assert cfg.attention_bias == (kind == "qwen2")
    assert cfg.qk_norm == (kind == "qwen3")
    assert cfg.bos_token_id == hc.bos_token_id
    eos = hc.eos_token_id
    assert cfg.eos_token_ids == (tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)))
    sd = load_state_dict(source, progress=False)
    assert list(sd) == expected_parameter_names(cfg)
    _assert_same_tensors(sd, _hf_state_dict(model))

    sd16 = load_state_dict(source, torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in sd16.values())


def test_hf_dir_legacy_rope_and_generation_eos(tmp_path):
    """config.json written by transformers 4 (rope_theta + rope_scaling `type`), eos from both files."""
    model = _tiny_model("llama", eos_token_id=3)
    d = tmp_path / "legacy"
    model.save_pretrained(d)
    config = json.loads((d / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    config.pop("head_dim")
    (d / "config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    cfg = load_model_config(resolve_model(str(d)))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.head_dim == 16
    assert cfg.eos_token_ids == (3, 7)


def test_hf_dir_missing_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_model("llama")
    d = tmp_path / "broken"
    model.save_pretrained(d)
    tensors = load_file(d / "model.safetensors")
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelSpecError, match="up_proj"):
        load_state_dict(resolve_model(str(d)), progress=False)


# ---------------------------------------------------------------- resolve errors


def test_resolve_nonexistent(tmp_path):
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(tmp_path / "nope"))
    assert "no such file" in _assert_spec_error_names_forms(e)


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(tmp_path))
    assert "without config.json" in _assert_spec_error_names_forms(e)


def test_resolve_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(tmp_path))
    assert "safetensors" in _assert_spec_error_names_forms(e)


def test_resolve_file_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"not a model")
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(f))
    assert "not a .gguf" in _assert_spec_error_names_forms(e)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"nope")
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(fake))
    _assert_spec_error_names_forms(e)


def test_resolve_unknown_alias():
    with pytest.raises(ModelSpecError) as e:
        resolve_model("gpt-7-ultra")
    _assert_spec_error_names_forms(e)


def test_resolve_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(tmp_path))
    assert "GPT2LMHeadModel" in _assert_spec_error_names_forms(e)


def test_resolve_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelSpecError) as e:
        resolve_model(str(path))
    assert "'gpt2'" in _assert_spec_error_names_forms(e)


# ---------------------------------------------------------------- tokenizer


def test_default_tokenizer(default_source, default_tokenizer):
    tok = default_tokenizer
    text = "Hello world, splitserve speaks token ids!"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids and tok.decode(ids) == text
    assert tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi there, model"}], add_generation_prompt=True, tokenize=False
    )
    assert "hi there, model" in prompt
    assert prompt.rstrip().endswith("assistant")
    cfg = load_model_config(default_source)
    assert tok.eos_token_id in cfg.eos_token_ids
    assert len(tok) == cfg.vocab_size


def _write_tokenizer_gguf(path: pathlib.Path) -> pathlib.Path:
    """A GGUF file whose metadata holds a small byte-level BPE tokenizer (GPT-2's 256 byte
    characters, 5 merges, 3 special tokens) and a chat template."""
    from splitserve.frontend.tokenizer import _byte_level_decoder

    byte_chars = {b: c for c, b in _byte_level_decoder().items()}
    merges = ["h e", "l l", "he ll", "\u0120 w", "o r"]
    tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
              + [byte_chars[b] for b in range(256)] + [m.replace(" ", "") for m in merges])
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                        "<|im_start|>assistant\n{% endif %}")
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _same_tokenizer(a, b) -> None:
    for text in ("hello world", "  hello\tworld\n\nhe", "h\u00e9llo w\u00f6rld \U0001f916",
                 "<|im_start|>user\nhello<|im_end|>", ""):
        assert a.encode(text) == b.encode(text), text
        assert a.decode(a.encode(text)) == b.decode(b.encode(text)), text
    chat = [{"role": "system", "content": "brief"}, {"role": "user", "content": "hello"}]
    assert (a.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id, len(a)) == (
        b.bos_token_id, b.eos_token_id, b.pad_token_id, len(b))
    assert a.get_vocab() == b.get_vocab()


def test_gguf_tokenizer_is_built_once_then_read_from_the_cache(tmp_path, monkeypatch, caplog):
    """transformers' GGUF tokenizer build (seconds on a real vocabulary) runs once a file; later
    loads read the saved copy, which tokenizes, decodes and templates chats the same. A
    changed file, a damaged entry or a cache that cannot be written: built from the file."""
    import transformers

    from splitserve.engine.model_loader import tokenizer as tokenizer_mod

    cache = tmp_path / "cache"
    monkeypatch.setattr(tokenizer_mod, "tokenizer_cache_dir", lambda: cache)
    builds: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def spy(cls, name, *args, **kwargs):
        if kwargs.get("gguf_file"):
            builds.append(kwargs["gguf_file"])
        return real(cls, name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(spy))
    path = _write_tokenizer_gguf(tmp_path / "tok.gguf")
    source = resolve_model(str(path))

    built = load_tokenizer(source)
    assert builds == ["tok.gguf"] and built.chat_template
    (entry,) = cache.iterdir()
    assert (entry / "tokenizer.json").is_file()
    cached = load_tokenizer(source)
    assert builds == ["tok.gguf"]  # read from the cache
    _same_tokenizer(built, cached)
    assert built.encode("hello world") == [261, 114, 262, 263, 111, 103]  # hell o Ġw or l d

    st = path.stat()  # the file changed (its mtime): a new entry
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_tokenizer(source)
    assert len(builds) == 2 and len(list(cache.iterdir())) == 2

    (entry / "tokenizer.json").write_text("{ not json")  # damaged: warned, rebuilt, replaced
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level("WARNING"):
        _same_tokenizer(load_tokenizer(source), built)
    assert len(builds) == 3 and "ignoring the cached tokenizer" in caplog.text
    _same_tokenizer(load_tokenizer(source), built)
    assert len(builds) == 3

    blocked = tmp_path / "a-file"  # the cache's place is taken: every load builds
    blocked.write_text("")
    monkeypatch.setattr(tokenizer_mod, "tokenizer_cache_dir", lambda: blocked / "tokenizers")
    _same_tokenizer(load_tokenizer(source), built)
    _same_tokenizer(load_tokenizer(source), built)
    assert len(builds) == 5

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(tokenizer_mod, "tokenizer_cache_dir", no_home)  # as Path.home() fails
    _same_tokenizer(load_tokenizer(source), built)
    assert len(builds) == 6
    assert sorted(p.name.startswith(".") for p in cache.iterdir()) == [False, False]  # no temps


def test_dir_tokenizer(tmp_path, default_tokenizer):
    model = _tiny_model("llama")
    d = tmp_path / "with-tok"
    model.save_pretrained(d)
    default_tokenizer.save_pretrained(d)
    tok = load_tokenizer(resolve_model(str(d)))
    assert tok.chat_template == default_tokenizer.chat_template
    assert tok.encode("round trip") == default_tokenizer.encode("round trip")
