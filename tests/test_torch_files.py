"""read_torch_file: torch-free reading of torch.save / torch.jit.save zips, checked against torch itself,
and its refusal of pickles that name anything off the allow-list (before anything runs)."""

import copy
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

from dspt_jax.models.torch_files import UnsafeCheckpointError, read_torch_file


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.gain = nn.Parameter(torch.randn(8))
        self.register_buffer("offsets", torch.arange(8))
        self.mask = torch.full((8,), 0.5)  # a plain tensor attribute: in no state_dict
        self.depth = 2

    def forward(self, x):
        return self.fc(self.ln(x)) * self.gain + self.offsets.float() * self.mask * self.depth


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(_Block(), _Block())
        self.head = nn.ModuleList([nn.Linear(8, 4)])
        self.logit_scale = nn.Parameter(torch.tensor(4.6))
        self.input_resolution = 10

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3))
        return self.head[0](self.blocks(y)) * self.logit_scale.exp()


def _net():
    torch.manual_seed(0)
    net = _Net().train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running stats and num_batches_tracked
            net(torch.randn(4, 3, 10, 10))
    return net.eval()


def _assert_same(got, ref):
    assert list(got) == list(ref)
    for name, t in ref.items():
        t = t.detach()
        if t.dtype == torch.bfloat16:
            assert got[name].dtype == np.float32, name
            np.testing.assert_array_equal(got[name], t.float().numpy(), err_msg=name)
        else:
            assert got[name].dtype == t.numpy().dtype, name
            assert got[name].shape == tuple(t.shape), name
            np.testing.assert_array_equal(got[name], t.numpy(), err_msg=name)


def test_state_dict_matches_torch(tmp_path):
    net = _net()
    for tag, sd in [("f32", net.state_dict()), ("f16", copy.deepcopy(net).half().state_dict())]:
        path = tmp_path / f"{tag}.pt"
        torch.save(sd, path)
        got = read_torch_file(path)
        _assert_same(got, sd)
        assert got["bn.num_batches_tracked"] == 3 and got["bn.num_batches_tracked"].dtype == np.int64
        assert got["conv.weight"].dtype == (np.float32 if tag == "f32" else np.float16)
    assert not np.allclose(got["bn.running_var"], 1.0)


def test_views_sharing_one_storage(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "cols": base[:, 1:],
        "transposed": base.T,
        "row": base[2],
        "strided": base[::2, ::3],
        "scalar": base[1, 1],
        "empty": base[:0],
        "expanded": torch.ones(3).expand(2, 3),
    }
    path = tmp_path / "views.pt"
    torch.save(tensors, path)
    got = read_torch_file(path)
    _assert_same(got, tensors)
    assert all(a.flags.c_contiguous and a.flags.writeable for a in got.values())


def test_nested_dicts_are_flattened(tmp_path):
    sd = _net().state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd, "epoch": 7, "extra": {"ema": {"w": torch.ones(2)}}, "tags": ["a"]}, path)
    got = read_torch_file(path)
    ref = {f"state_dict.{k}": v for k, v in sd.items()} | {"extra.ema.w": torch.ones(2)}
    _assert_same(got, ref)


def test_dtypes_round_trip(tmp_path):
    torch.manual_seed(1)
    tensors = {
        "bf16": torch.randn(5, 3).bfloat16(),
        "bf16_view": torch.randn(4, 4).bfloat16()[1:, ::2],
        "f64": torch.randn(3, dtype=torch.float64),
        "i32": torch.tensor([-1, 2**30], dtype=torch.int32),
        "i16": torch.tensor([-7, 9], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "u16": torch.tensor([1, 65535], dtype=torch.uint16),  # written as UntypedStorage + _rebuild_tensor_v3
        "bool": torch.tensor([True, False, True]),
        "c64": torch.randn(2, dtype=torch.complex64),
        "param": nn.Parameter(torch.randn(2, 2)),
    }
    path = tmp_path / "dtypes.pt"
    torch.save(tensors, path)
    _assert_same(read_torch_file(path), tensors)


def _rename_top_folder(src, dst, folder):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(folder + "/" + info.filename.split("/", 1)[1], zin.read(info))


@pytest.mark.parametrize("mode", ["script", "trace"])
def test_torchscript_matches_jit_load(tmp_path, mode):
    net = _net()
    x = torch.randn(2, 3, 10, 10)
    module = torch.jit.script(net) if mode == "script" else torch.jit.trace(net, x)
    path = tmp_path / f"{mode}.pt"
    torch.jit.save(module, path)
    ref = torch.jit.load(path).state_dict()
    got = read_torch_file(path)
    _assert_same(got, ref)
    assert list(got) == list(net.state_dict())  # also the eager module's names: the plain `mask` is not in
    assert "logit_scale" in got and "blocks.1.offsets" in got and "bn.num_batches_tracked" in got

    renamed = tmp_path / "RN50.pt"
    _rename_top_folder(path, renamed, "RN50")
    _assert_same(read_torch_file(renamed), ref)


def _unicode(s: str) -> bytes:
    """The pickle opcode BINUNICODE for s."""
    data = s.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _malicious_zip(path, global_line: bytes, argument: str):
    """A zip laid out like torch.save's whose data.pkl is {"w": <tensor>, "x": GLOBAL(argument)}."""

    pkl = b"\x80\x02}(" + _unicode("x") + b"c" + global_line + b"\n" + _unicode(argument) + b"\x85R" + b"u."
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/data/0", b"\0" * 16)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")
    return pkl


@pytest.mark.parametrize(
    "global_line, template",
    [
        (b"os\nsystem", "touch {marker}"),
        (b"builtins\neval", "open({marker!r}, 'w').close()"),
        (b"__builtin__\neval", "open({marker!r}, 'w').close()"),
    ],
    ids=["os.system", "builtins.eval", "__builtin__.eval"],
)
def test_malicious_pickle_is_refused_before_it_runs(tmp_path, global_line, template):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    pkl = _malicious_zip(path, global_line, template.format(marker=str(marker)))
    pickle.loads(pkl)  # the payload is real: an ordinary unpickler runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError) as err:
        read_torch_file(path)
    assert global_line.decode().replace("\n", ".") in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_pickle_cannot_alter_later_loads(tmp_path):
    """BUILD onto an allowed global (here: the FloatStorage stand-in's dtype) only touches that load's copy."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(4.0)}, good)
    poison = tmp_path / "poison.pt"
    state = b"}" + _unicode("dtype") + _unicode("f2") + b"s"
    with zipfile.ZipFile(poison, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02ctorch\nFloatStorage\n" + state + b"b0}.")
    assert read_torch_file(poison) == {}
    _assert_same(read_torch_file(good), {"w": torch.arange(4.0)})


def test_unsupported_dtype_is_a_clear_error(tmp_path):
    path = tmp_path / "f8.pt"
    torch.save({"w": torch.zeros(2, dtype=torch.float8_e4m3fn)}, path)
    with pytest.raises(ValueError, match="float8_e4m3fn are not supported"):
        read_torch_file(path)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), path)  # a pickled nn.Module, not a state dict
    with pytest.raises(UnsafeCheckpointError, match="torch.nn.modules.linear.Linear"):
        read_torch_file(path)


def test_not_a_zip_and_legacy_format(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a zip-format PyTorch checkpoint.*safetensors"):
        read_torch_file(junk)

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy \(non-zip\) torch.save format.*recent torch.*safetensors"):
        read_torch_file(os.fspath(legacy))
