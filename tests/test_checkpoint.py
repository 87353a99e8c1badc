"""trainer/checkpoint.py: a checkpoint is whole or invisible, loads without unpickling, and is found by URL.

Run: .venv/bin/pytest tests/test_checkpoint.py
"""

import json
import os

import pytest
import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointError


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return model, opt


def _save_all_ranks(path, world=2, step=7):
    model, opt = _model_and_opt()
    for rank in range(world):
        checkpoint.save(path, model=model, optimizer=opt, loader_state={"rank": rank, "doc": 10 + rank},
                        rank=rank, world_size=world, step=step, stage="pretrain", run="r1",
                        loop_state={"seconds": 1.5, "tokens": 100})
    return model, opt


def test_save_restore_roundtrip(tmp_path):
    path = str(tmp_path / checkpoint.dir_name("pretrain", 7))
    model, opt = _save_all_ranks(path)
    assert sorted(os.listdir(path)) == ["loader_rank0.json", "loader_rank1.json", "meta.json", "model.pt",
                                        "optim_rank0.pt", "optim_rank1.pt"]
    fresh, fresh_opt = _model_and_opt(seed=1)
    meta, loader_state = checkpoint.restore(path, model=fresh, optimizer=fresh_opt, rank=1, world_size=2)
    assert meta.step == 7 and meta.loop_state == {"seconds": 1.5, "tokens": 100}
    assert loader_state == {"rank": 1, "doc": 11}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_partial_checkpoint_is_refused(tmp_path):
    path = str(tmp_path / "pretrain_step000007")
    _save_all_ranks(path)
    os.remove(os.path.join(path, "optim_rank1.pt"))  # rank 1 died before its upload
    with pytest.raises(CheckpointError, match="missing optim_rank1.pt"):
        checkpoint.verify(path)
    os.remove(os.path.join(path, "meta.json"))
    with pytest.raises(CheckpointError, match="no meta.json"):
        checkpoint.verify(path)


def test_world_size_mismatch_names_both(tmp_path):
    path = str(tmp_path / "pretrain_step000007")
    _save_all_ranks(path)
    model, opt = _model_and_opt()
    with pytest.raises(CheckpointError, match="2 ranks and this run has 4"):
        checkpoint.restore(path, model=model, optimizer=opt, rank=0, world_size=4)


def test_latest_skips_incomplete_and_honours_step(tmp_path):
    stage = tmp_path / "pretrain"
    for step in (5, 10, 15):
        _save_all_ranks(str(stage / checkpoint.dir_name("pretrain", step)), step=step)
    os.remove(stage / "pretrain_step000015" / "model.pt")  # a save that crashed half-way
    (stage / "summary.json").write_text("{}")
    url = f"file://{stage}"
    assert checkpoint.latest(url).endswith("pretrain_step000010")
    assert checkpoint.latest(url, step=5).endswith("pretrain_step000005")
    assert checkpoint.latest(url, step=15) is None
    assert checkpoint.latest(f"file://{tmp_path}/nothing") is None
    state, meta = checkpoint.load_model_state(checkpoint.latest(url))
    assert meta.step == 10 and set(state) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = str(tmp_path / "pretrain_step000007")
    _save_all_ranks(path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"0.weight": Evil()}, os.path.join(path, "model.pt"))
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        checkpoint.load_model_state(f"file://{path}")


def test_meta_is_json_with_format(tmp_path):
    path = str(tmp_path / "sft_step000003")
    _save_all_ranks(path, world=1, step=3)
    meta = json.loads((tmp_path / "sft_step000003" / "meta.json").read_text())
    assert meta["format"] == "llmctl.checkpoint/v1" and meta["files"][0] == "model.pt"
    meta["format"] = "other"
    (tmp_path / "sft_step000003" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        checkpoint.verify(path)


def test_hostile_checkpoint_json_reads_are_bounded(tmp_path):
    # meta.json and a rank's loader state sit in shared storage: a 1 GiB one is refused before it is read.
    from trainer.checkpoint import CheckpointError, _loader_state, loader_file, verify

    with open(tmp_path / "meta.json", "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(CheckpointError, match="over"):
        verify(str(tmp_path))
    with open(tmp_path / loader_file(0), "wb") as f:
        f.truncate(1 << 30)
    with pytest.raises(CheckpointError, match="over"):
        _loader_state(str(tmp_path), 0)
