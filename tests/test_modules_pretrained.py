"""DeltaHandle.save_pretrained / from_pretrained: a delta as a peft-style folder (issue 24).

peft cannot register a third-party tuner (checked below, so that a peft that can fails this
test and the route is revisited); the folder round-trips a trained delta bit for bit, refuses
another base, holds a plain SparseDelta file, and refuses folders whose files disagree.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import sparsetune as st
from sparsetune.modules import SLOT


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(self.emb(ids)))).mean(1)


def _base(dtype: torch.dtype = torch.float32, seed: int = 0) -> Small:
    torch.manual_seed(seed)
    return Small().to(dtype)


def _bytes(model: nn.Module) -> dict[str, bytes]:
    return {k: v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for k, v in model.state_dict().items()}


def _trained(dtype: torch.dtype = torch.float32) -> tuple[Small, st.DeltaHandle, torch.Tensor]:
    model = _base(dtype)
    g = torch.Generator().manual_seed(1)
    mask = st.Mask.from_dict({n: torch.rand(p.shape, generator=g) < 0.3
                              for n, p in model.named_parameters()})
    handle = st.attach(model, mask, name="task")
    ids = torch.randint(0, 20, (16, 5), generator=g)
    target = torch.randn(16, 3, generator=g)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (model(ids).float() - target).square().mean().backward()
        opt.step()
    return model, handle, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_trained_delta_round_trips_bit_for_bit(tmp_path, dtype):
    model, handle, ids = _trained(dtype)
    folder = handle.save_pretrained(tmp_path / "task", base_model_name_or_path="my/base")
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json", "sparse_delta.safetensors", "sparse_values.safetensors"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSE" and config["name"] == "task"
    assert config["base_model_name_or_path"] == "my/base"
    assert config["target_modules"] == ["emb", "fc", "head"]
    total = sum(p.numel() for p in _base().parameters())
    assert config["num_entries"] == handle.num_values
    assert config["density"] == handle.num_values / total
    fresh = _base(dtype)
    before = _bytes(fresh)
    loaded = st.DeltaHandle.from_pretrained(fresh, folder)
    assert loaded.name == "task" and _bytes(fresh) == before
    saved = dict(handle.named_parameters())
    for name, values in loaded.named_parameters():
        assert values.dtype == torch.float32 and torch.equal(values, saved[name])
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    # the delta file inside is a plain SparseDelta: applying it equals merging the module
    applied = _base(dtype)
    st.SparseDelta.load(folder / "sparse_delta.safetensors").apply_to(applied)
    loaded.merge()
    assert _bytes(fresh) == _bytes(applied)
    again = st.DeltaHandle.from_pretrained(_base(dtype), folder, name="other")
    assert again.name == "other"


def test_another_base_is_refused_and_left_untouched(tmp_path):
    _, handle, _ = _trained()
    folder = handle.save_pretrained(tmp_path / "task")
    other = _base(seed=9)
    before = _bytes(other)
    with pytest.raises(st.BaseModelMismatchError, match="another base model"):
        st.DeltaHandle.from_pretrained(other, folder)
    assert _bytes(other) == before
    assert not any(hasattr(m, SLOT) for m in other.modules())


def test_folders_whose_files_disagree_are_refused(tmp_path):
    _, handle, _ = _trained()
    folder = handle.save_pretrained(tmp_path / "task")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # the values of a later save next to the delta of an earlier one (an interrupted rewrite)
    later = tmp_path / "later"
    with torch.no_grad():
        next(handle.parameters()).add_(0.25)
    handle.save_pretrained(later)
    (folder / "sparse_values.safetensors").write_bytes(
        (later / "sparse_values.safetensors").read_bytes())
    with pytest.raises(st.FileFormatError, match=r"disagree on \['values of emb.weight'\]"):
        st.DeltaHandle.from_pretrained(_base(), folder)
    config_path.write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(st.FileFormatError, match="'LORA' is not 'SPARSE'"):
        st.DeltaHandle.from_pretrained(_base(), folder)
    config_path.write_text(json.dumps({**config, "num_entries": 3}))
    with pytest.raises(st.FileFormatError, match="num_entries"):
        st.DeltaHandle.from_pretrained(_base(), folder)
    with pytest.raises(st.FileFormatError, match=r"no adapter_config\.json"):
        st.DeltaHandle.from_pretrained(_base(), tmp_path / "nowhere")


def test_peft_cannot_register_a_third_party_tuner_type(tmp_path):
    """Why the folder is sparsetune's own: peft's registration takes only PeftType members,
    and peft refuses the saved folder's type."""
    peft = pytest.importorskip("peft")
    from peft.utils import register_peft_method

    with pytest.raises(ValueError, match="Unknown PEFT type SPARSE"):
        register_peft_method(name="sparse", config_cls=object, model_cls=nn.Module)
    _, handle, _ = _trained()
    folder = handle.save_pretrained(tmp_path / "task")
    with pytest.raises(KeyError, match="SPARSE"):
        peft.PeftConfig.from_pretrained(str(folder))
