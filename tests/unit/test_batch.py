import numpy as np
import pytest
import torch

from verlcli.data.batch import Batch


def make(n=5):
    return Batch({"x": torch.arange(n), "y": torch.arange(2 * n).view(n, 2)}, {"s": [f"r{i}" for i in range(n)]}, {"m": 1})


def test_split_concat_roundtrip():
    b, pad = make(5).pad_to_divisor(2)
    assert pad == 1 and len(b) == 6
    assert b["x"].tolist() == [0, 1, 2, 3, 4, 0]
    parts = b.split(2)
    assert [p["x"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 0]]
    back = Batch.concat(parts).unpad(pad)
    assert back["x"].tolist() == [0, 1, 2, 3, 4]
    assert list(back["s"]) == ["r0", "r1", "r2", "r3", "r4"]
    assert back.meta == {"m": 1}


def test_split_needs_divisor():
    with pytest.raises(ValueError, match="pad_to_divisor"):
        make(5).split(2)


def test_repeat_interleave_and_tile():
    b = make(2)
    assert b.repeat(3)["x"].tolist() == [0, 0, 0, 1, 1, 1]
    assert list(b.repeat(2)["s"]) == ["r0", "r0", "r1", "r1"]
    assert b.repeat(2, interleave=False)["x"].tolist() == [0, 1, 0, 1]
    assert b.repeat(2, interleave=False)["y"].shape == (4, 2)


def test_index_mask_and_union_and_mismatch():
    b = make(4)
    sel = b.index(torch.tensor([True, False, True, False]))
    assert sel["x"].tolist() == [0, 2] and list(sel["s"]) == ["r0", "r2"]
    u = b.union(Batch({"z": torch.zeros(4)}))
    assert set(u.keys()) == {"x", "y", "s", "z"}
    with pytest.raises(ValueError, match="disagree"):
        Batch({"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(KeyError, match="no column"):
        b["nope"]


def test_non_tensor_dicts_stay_objects():
    b = Batch(non_tensors={"d": [{"a": 1}, {"a": 2}]})
    assert b["d"].dtype == object and b.repeat(2)["d"][1] == {"a": 1}
    assert len(b.chunks_of(1)) == 2
