"""FastPose's state_dict layout and the checkpoint loader's refusals (spec §2.3)."""
from __future__ import annotations

import os
import pickle

import pytest
import torch

from conftest import SHARED, requires_shared
from tasks.model import CheckpointError, build_fastpose

KEYS_FILE = SHARED / "spec" / "fastpose_res50_state_dict_keys.txt"


@pytest.fixture(scope="module")
def state():
    return build_fastpose(seed=0).state_dict()


def test_counts(state):
    assert len(state) == 348
    assert sum(p.numel() for p in build_fastpose().parameters()) == 40_577_745


@requires_shared
def test_keys_shapes_and_order_match_upstream(state):
    expected = []
    for line in KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            expected.append((key, shape, dtype))
    got = [(k, str(list(v.shape)), str(v.dtype).replace("torch.", "")) for k, v in state.items()]
    assert got == expected


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def test_plain_prefixed_and_wrapped_forms_load(tmp_path, state):
    x = torch.randn(1, 3, 256, 192)
    with torch.inference_mode():
        ref = build_fastpose(state)(x)
        for obj in (state, {f"module.{k}": v for k, v in state.items()}, {"state_dict": state}, {"model": state}):
            out = build_fastpose(_save(obj, tmp_path / "c.pth"))(x)
            assert torch.equal(out, ref)


def test_truncated_file_is_one_line(tmp_path, random_checkpoint):
    data = open(random_checkpoint, "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as e:
        build_fastpose(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "truncated" in str(e.value)


def test_other_model_names_missing_unexpected_and_misshaped(tmp_path, state):
    other = dict(state)
    other.pop("conv_out.bias")
    other["head.fc.weight"] = torch.zeros(3)
    other["conv_out.weight"] = torch.zeros(10, 128, 3, 3)
    with pytest.raises(CheckpointError) as e:
        build_fastpose(_save(other, tmp_path / "other.pth"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing: conv_out.bias" in msg and "1 unexpected: head.fc.weight" in msg
    assert "1 mis-shaped: conv_out.weight [10, 128, 3, 3]!=[17, 128, 3, 3]" in msg


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/runner-pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    legacy = tmp_path / "evil.pkl"
    with open(legacy, "wb") as f:
        pickle.dump({"preact.conv1.weight": _Exploit()}, f)
    zipped = tmp_path / "evil.pth"
    torch.save({"preact.conv1.weight": _Exploit()}, zipped)
    for p in (legacy, zipped):
        with pytest.raises(CheckpointError) as e:
            build_fastpose(str(p))
        assert "\n" not in str(e.value)
    assert not os.path.exists("/tmp/runner-pwned")


def test_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="not a state_dict"):
        build_fastpose(_save([torch.zeros(1)], tmp_path / "list.pth"))
