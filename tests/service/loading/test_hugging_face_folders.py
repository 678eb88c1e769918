"""Hugging Face checkpoint folders: the model transformers itself builds from the same files, built
here on the meta device first, filled through our reader, and refused with one line when the
config or the files are not what they claim."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from curvscope_service.errors import InvalidInput, NotFound, ResourceExhausted, Unimplemented
from curvscope_service.loading import describe_model, load_model
from curvscope_service.loading.hugging_face import DIMENSION_CAPS, MAX_CONFIG_BYTES
from hugging_face_folders import TINY, save_folder, tiny_model, token_batch


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Every tiny architecture saved by save_pretrained, with the model that wrote it."""
    root = tmp_path_factory.mktemp("hf")
    return {name: (save_folder(model := tiny_model(name), root / name), model) for name in TINY}


def _inputs(architecture: str, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    named = {"input_ids": ids, "attention_mask": mask}
    if architecture.startswith("Bert"):
        named["token_type_ids"] = (torch.arange(ids.shape[1]) >= ids.shape[1] // 2).long().expand_as(ids)
    return named


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("architecture", list(TINY))
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_logits_equal_transformers_own_model(folders, architecture, dtype, tolerance):
    """Absolute and relative tolerance 1e-6 in float32, 1e-12 in float64, padded rows included."""
    folder, reference = folders[architecture]
    loaded = load_model(folder, dtype=dtype)
    assert loaded.format == "hugging_face" and loaded.architecture == architecture
    assert [i.name for i in loaded.inputs] == list(_inputs(architecture, *token_batch()))
    assert all(i.dtype == torch.int64 and i.sample_shape == (None,) for i in loaded.inputs)
    named = _inputs(architecture, *token_batch())
    with torch.no_grad():
        expected = reference.to(dtype)(**named).logits
        reference.float()
        got = loaded.module(*named.values())
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)
    # counted as transformers counts them: tied embeddings once
    assert loaded.num_parameters == reference.num_parameters()
    assert not loaded.module.training


@pytest.mark.parametrize("architecture", ["BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM"])
def test_masked_tokens_change_nothing(folders, architecture):
    """Other tokens under attention_mask == 0 leave every unmasked output as it was (1e-6)."""
    loaded = load_model(folders[architecture][0])
    ids, mask = token_batch()
    other = torch.where(mask.bool(), ids, (ids + 7) % 19 + 1)
    assert not torch.equal(other, ids)
    with torch.no_grad():
        first = loaded.module(*_inputs(architecture, ids, mask).values())
        second = loaded.module(*_inputs(architecture, other, mask).values())
    if first.dim() == 3:  # per token: the padded positions' own outputs are not used by any loss
        first, second = first[mask.bool()], second[mask.bool()]
    torch.testing.assert_close(first, second, atol=1e-6, rtol=1e-6)


def test_trailing_inputs_may_be_left_out(folders):
    folder, reference = folders["GPT2LMHeadModel"]
    ids, _ = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder).module(ids), reference(input_ids=ids).logits, atol=1e-6, rtol=1e-6)


def test_sharded_folder_holds_the_same_model(folders, tmp_path):
    folder, reference = folders["BertForSequenceClassification"]
    sharded = save_folder(reference, tmp_path / "sharded", shard_bytes=2_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2 and (sharded / "model.safetensors.index.json").exists()
    one, many = load_model(folder), load_model(sharded)
    for (name, a), (other, b) in zip(one.module.state_dict().items(), many.module.state_dict().items(), strict=True):
        assert name == other and torch.equal(a, b)


def test_weights_come_through_our_reader_only(folders, monkeypatch):
    """Neither the safetensors library, nor torch.load, nor transformers' from_pretrained sees the files."""
    import safetensors
    import safetensors.torch

    from curvscope_service.loading.hugging_face import import_transformers

    def never(*args, **kwargs):
        raise AssertionError("a user's file reached another reader")

    for owner, name in [(safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "load"),
                        (torch, "load"), (import_transformers().PreTrainedModel, "from_pretrained")]:
        monkeypatch.setattr(owner, name, never)
    loaded = load_model(folders["GPT2LMHeadModel"][0])
    assert loaded.num_parameters > 1000


def test_blocks_carry_the_model_names(folders):
    bert = load_model(folders["BertForSequenceClassification"][0])
    assert list(bert.parameter_blocks) == [
        "bert.embeddings",
        *[f"bert.encoder.layer.{i}.{part}" for i in range(2) for part in ("attention", "intermediate", "output")],
        "bert.pooler", "classifier"]
    gpt2 = load_model(folders["GPT2LMHeadModel"][0])
    assert list(gpt2.parameter_blocks) == [
        "transformer.wte", "transformer.wpe",
        *[f"transformer.h.{i}.{part}" for i in range(2) for part in ("ln_1", "attn", "ln_2", "mlp")],
        "transformer.ln_f"]  # lm_head is transformer.wte's weight: counted there
    described = describe_model(gpt2)
    assert described["format"] == "hugging_face" and described["architecture"] == "GPT2LMHeadModel"
    assert sum(block["num_parameters"] for block in described["blocks"]) == gpt2.num_parameters
    assert described["lipschitz_chain"]["found"] is False


def test_base_model_checkpoint_with_legacy_buffers_loads(folders, tmp_path):
    """The original GPT-2 files: names without 'transformer.', the causal masks 'h.N.attn.bias'
    stored, lm_head left to the tie."""
    folder, reference = folders["GPT2LMHeadModel"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(folder / "config.json", legacy / "config.json")
    tensors = {name.removeprefix("transformer."): tensor
               for name, tensor in load_file(str(folder / "model.safetensors")).items()}
    tensors.update({f"h.{i}.attn.bias": torch.ones(1, 1, 12, 12).tril() for i in range(2)})
    save_file(tensors, str(legacy / "model.safetensors"))
    ids, mask = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_model(legacy).module(ids, mask), reference(input_ids=ids, attention_mask=mask).logits,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("changes, error, fragments", [
    ({"auto_map": {"AutoModel": "modeling_evil.Evil"}}, InvalidInput, ("remote code", "auto_map")),
    ({"trust_remote_code": True}, InvalidInput, ("trust_remote_code",)),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, InvalidInput, ("quantized",)),
    ({"model_type": "t5"}, Unimplemented, ("model_type 't5'", "bert, gpt2, llama")),
    ({"architectures": ["GPT2DoubleHeadsModel"]}, Unimplemented, ("GPT2DoubleHeadsModel", "GPT2LMHeadModel")),
    ({"architectures": []}, InvalidInput, ("names no architecture",)),
    ({"n_embd": 10**9}, InvalidInput, ("n_embd", str(DIMENSION_CAPS["hidden_size"]))),
    ({"n_layer": True}, InvalidInput, ("n_layer",)),
    ({"vocab_size": "20"}, InvalidInput, ("vocab_size",)),
    ({"n_head": 3}, InvalidInput, ("GPT2LMHeadModel",)),  # 8 is not divisible by 3: transformers' own check
])
def test_refused_configs(folders, tmp_path, refuses, changes, error, fragments):
    folder = _edit_config(_copy(folders["GPT2LMHeadModel"][0], tmp_path / "edited"), **changes)
    with refuses(error, *fragments):
        load_model(folder)


def test_config_json_is_parsed_within_caps(folders, tmp_path, refuses):
    folder = _copy(folders["GPT2LMHeadModel"][0], tmp_path / "edited")
    (folder / "config.json").write_text("[1, 2]")
    with refuses(InvalidInput, "config.json must be a JSON object"):
        load_model(folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with refuses(InvalidInput, "config.json", "nests JSON deeper"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "padding": "x" * MAX_CONFIG_BYTES}))
    with refuses(InvalidInput, "config.json", "limit"):
        load_model(folder)


def test_parameters_are_counted_on_the_meta_device_first(folders, tmp_path, refuses):
    """A config within every dimension cap that declares 2.7e11 parameters: refused in seconds,
    with nothing allocated (the weights file is the 2,000-parameter one)."""
    folder = _edit_config(_copy(folders["GPT2LMHeadModel"][0], tmp_path / "huge"),
                          vocab_size=DIMENSION_CAPS["vocab_size"], n_embd=DIMENSION_CAPS["hidden_size"], n_layer=1)
    started = time.perf_counter()
    with refuses(ResourceExhausted, "declares", "over the limit of 2000000000"):
        load_model(folder)
    assert time.perf_counter() - started < 30
    with refuses(ResourceExhausted, "over the limit of 100"):
        load_model(folders["GPT2LMHeadModel"][0], max_parameters=100)


def _rewrite_weights(folder: Path, target: Path, edit) -> Path:
    _copy(folder, target)
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("edit, fragments", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"), ("missing transformer.h.1.mlp.c_fc.weight",)),
    (lambda t: t.update(extra=torch.zeros(2)), ("unexpected extra",)),
    (lambda t: t.update({"transformer.ln_f.weight": torch.ones(9)}), ("mismatched", "transformer.ln_f.weight F32[9] vs float32[8]")),
    (lambda t: t.update({"transformer.ln_f.weight": torch.ones(8, dtype=torch.int32)}), ("mismatched", "I32[8]")),
    (lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}), ("ties", "tie_word_embeddings")),
])
def test_weights_must_fit_the_config(folders, tmp_path, refuses, edit, fragments):
    folder = _rewrite_weights(folders["GPT2LMHeadModel"][0], tmp_path / "edited", edit)
    with refuses(InvalidInput, *fragments):
        load_model(folder)


def test_an_untied_copy_of_a_tied_weight_loads(folders, tmp_path):
    """Some files store lm_head.weight beside the embedding it is tied to: equal values load."""
    folder = _rewrite_weights(folders["GPT2LMHeadModel"][0], tmp_path / "both",
                              lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"].clone()}))
    assert load_model(folder).num_parameters == folders["GPT2LMHeadModel"][1].num_parameters()


def test_folder_layout_is_checked(folders, tmp_path, refuses):
    folder, reference = folders["GPT2LMHeadModel"]
    no_config = _copy(folder, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    with refuses(InvalidInput, "no config.json"):
        load_model(no_config)
    pickled = _copy(folder, tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with refuses(InvalidInput, "has no weights", "never read"):
        load_model(pickled)
    sharded = save_folder(reference, tmp_path / "sharded", shard_bytes=2_000)
    both = _copy(sharded, tmp_path / "both")
    shutil.copy(folder / "model.safetensors", both / "model.safetensors")
    with refuses(InvalidInput, "both model.safetensors and model.safetensors.index.json"):
        load_model(both)
    lost = _copy(sharded, tmp_path / "lost")
    next(lost.glob("model-00002-*")).unlink()
    with refuses(NotFound, "names shard 'model-00002-of-"):
        load_model(lost)
    stray = _copy(sharded, tmp_path / "stray")
    shards = sorted(stray.glob("model-*"))
    shutil.copy(shards[0], stray / "model-00009-of-00009.safetensors")
    with refuses(InvalidInput, "model-00009-of-00009.safetensors is not named"):
        load_model(stray)
    moved = _copy(sharded, tmp_path / "moved")
    index = json.loads((moved / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shards[-1].name
    (moved / "model.safetensors.index.json").write_text(json.dumps(index))
    with refuses(InvalidInput, name, "puts in"):
        load_model(moved)


def test_format_and_architecture_overrides(folders, tmp_path, refuses):
    folder, reference = folders["GPT2LMHeadModel"]
    with refuses(InvalidInput, "given as torch_export", "the folder looks like hugging_face"):
        load_model(folder, format="torch_export")
    with refuses(InvalidInput, "BertForMaskedLM is a bert model", "model_type 'gpt2'"):
        load_model(folder, architecture="BertForMaskedLM")
    with refuses(InvalidInput, "brings its own config.json"):
        load_model(folder, config={"n_layer": 1})
    # the class of a folder is not a safetensors state-dict architecture
    single = tmp_path / "single.safetensors"
    save_file({k: v.clone() for k, v in reference.state_dict().items()}, str(single),
              metadata={"architecture": "GPT2LMHeadModel", "config": (folder / "config.json").read_text()})
    with refuses(InvalidInput, "loads from a Hugging Face checkpoint folder"):
        load_model(single)


def test_the_vetting_child_loads_a_folder_within_its_memory_cap(folders, tmp_path, refuses):
    """transformers and the model fit the child's default address-space cap; a refusal in the
    child reaches the caller as the loader's own message."""
    from curvscope_service.loading.vetting import Vetter
    from curvscope_service.store import folder_digest

    folder = folders["GPT2LMHeadModel"][0]
    remote = _edit_config(_copy(folder, tmp_path / "remote"), trust_remote_code=True)
    vetter = Vetter()
    try:
        vetter.check_model(folder, folder_digest(folder))
        with refuses(InvalidInput, "trust_remote_code", "never runs remote code"):
            vetter.check_model(remote, folder_digest(remote))
    finally:
        vetter.close()


def test_without_transformers_folders_are_neither_advertised_nor_loaded(folders, monkeypatch, refuses):
    import importlib.util
    import sys

    from curvscope_service.loading import known_architectures
    from curvscope_service.loading.checkpoint import available_formats

    assert "hugging_face" in available_formats() and "GPT2LMHeadModel" in known_architectures()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "transformers" else find_spec(name, *args))
    monkeypatch.setitem(sys.modules, "transformers", None)  # the import fails as if it were absent
    assert "hugging_face" not in available_formats()
    assert known_architectures()[0] == "sequential" and not set(TINY) & set(known_architectures())
    with refuses(Unimplemented, "install curvscope-service[hf]"):
        load_model(folders["GPT2LMHeadModel"][0])


@pytest.mark.parametrize("architecture", ["BertForSequenceClassification", "GPT2LMHeadModel", "LlamaForCausalLM"])
def test_per_sample_gradients_under_vmap_equal_a_loop(folders, architecture):
    """Per-sample quantities (non-uniformity, the empirical Fisher) vmap the model over samples:
    no data-dependent branch on the padding mask may stop them (absolute 1e-12, float64)."""
    from torch.func import functional_call, grad, vmap

    module = load_model(folders[architecture][0], dtype=torch.float64).module
    params = {name: p.detach() for name, p in module.named_parameters()}
    ids, mask = token_batch()

    def loss(values, sample_ids, sample_mask):
        return functional_call(module, values, (sample_ids[None], sample_mask[None])).logsumexp(-1).mean()

    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, mask)
    for row in range(len(ids)):
        single = grad(loss)(params, ids[row], mask[row])
        for name in params:
            torch.testing.assert_close(batched[name][row], single[name], atol=1e-12, rtol=0)
