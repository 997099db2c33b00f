"""The `.safetensors` reader (torch and the standard library only): files written by hand from
the format's definition, and malformed ones, each refused in one line naming the file, without
allocating more than the file holds."""
import json
import struct
import subprocess
import sys
import time

import pytest
import torch

from mpafer import clip
from mpafer.clip.safetensors_reader import from_little_endian, read_safetensors
from tests.helpers import REPO, tiny_clip, tiny_state_dict, write_safetensors


def test_every_dtype_shape_and_the_metadata(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g), "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(), "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 3), "i32": torch.arange(6, dtype=torch.int32).reshape(3, 2),
        "i16": torch.tensor([-7, 300], dtype=torch.int16), "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }
    path = write_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    read = read_safetensors(path)
    assert list(read) == list(tensors)  # (written in this order, one after the other)
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and read[name].shape == t.shape, name
        assert torch.equal(read[name], t), name


def test_a_clip_state_dict_loads_like_the_pt_file(tmp_path):
    sd = tiny_state_dict(seed=3)
    torch.save(sd, tmp_path / "clip.pt")
    write_safetensors({"module." + k: v for k, v in sd.items()}, tmp_path / "clip.safetensors")
    x = torch.randn(2, 3, 32, 32)
    a, _ = clip.load(str(tmp_path / "clip.pt"), device="cpu", activation="quick_gelu")
    b, _ = clip.load(str(tmp_path / "clip.safetensors"), device="cpu", activation="quick_gelu")
    assert torch.equal(a.encode_image(x), b.encode_image(x))
    assert torch.equal(a.encode_image(x), tiny_clip(seed=3).encode_image(x))
    # Found by its content too, whatever its name (PyTorch's files start otherwise).
    (tmp_path / "renamed.bin").write_bytes((tmp_path / "clip.safetensors").read_bytes())
    c, _ = clip.load(str(tmp_path / "renamed.bin"), device="cpu", activation="quick_gelu")
    assert torch.equal(a.encode_image(x), c.encode_image(x))


def test_big_endian_hosts_swap_the_bytes():
    data = bytearray(struct.pack(">3f", 1.5, -2.0, 3.25))  # what a big-endian host reads natively
    assert from_little_endian(data, torch.float32, byteorder="big").tolist() == [1.5, -2.0, 3.25]
    data = bytearray(struct.pack("<2h", -7, 300))
    assert from_little_endian(data, torch.int16, byteorder="little").tolist() == [-7, 300]


def file_with_header(header, data=b"", length=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "too short": (b"\x01\x00\x00", "too short"),
    "header longer than the file": (file_with_header({"a": F32}, bytes(8), length=10 ** 6),
                                    "header length 1000000 is larger than the file"),
    "header not JSON": (file_with_header(b"{not json"), "header is not JSON"),
    "header not UTF-8": (file_with_header(b'{"\xff": 1}'), "header is not JSON"),
    "deeply nested header": (file_with_header(b"[" * 100000 + b"]" * 100000), "header is not JSON"),
    "header a list": (file_with_header([1, 2]), "a JSON list, not an object"),
    "entry not an object": (file_with_header({"a": 3}, bytes(8)), "'a' is not an object"),
    "unknown dtype": (file_with_header({"a": {**F32, "dtype": "F4"}}, bytes(8)), "unknown dtype 'F4'"),
    "negative size": (file_with_header({"a": {**F32, "shape": [-2]}}, bytes(8)), "the shape [-2]"),
    "offsets outside": (file_with_header({"a": {**F32, "data_offsets": [0, 2 ** 40]}}, bytes(8)),
                        "outside the 8 bytes of data"),
    "offsets reversed": (file_with_header({"a": {**F32, "data_offsets": [8, 0]}}, bytes(8)),
                         "outside the 8 bytes of data"),
    "offsets not two ints": (file_with_header({"a": {**F32, "data_offsets": [0, "8"]}}, bytes(8)),
                             "not [begin, end]"),
    "size not numel x itemsize": (file_with_header({"a": {**F32, "shape": [3]}}, bytes(8)),
                                  "needs 12 bytes, its data_offsets give 8"),
    "huge shape": (file_with_header({"a": {**F32, "shape": [2 ** 40, 2 ** 40]}}, bytes(8)),
                   "needs 4835703278458516698824704 bytes"),
    "overlapping tensors": (file_with_header({"a": F32, "b": F32}, bytes(8)), "overlap"),
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_files_are_one_line_errors_naming_the_file(tmp_path, what):
    content, reason = MALFORMED[what]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        clip.load(str(path), device="cpu", activation="gelu")
    message = str(e.value)
    assert message.startswith(f"{path} is not a valid safetensors file: ") and reason in message
    assert "\n" not in message


def test_header_length_2_to_the_62_is_refused_at_once_by_the_scripts(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2 ** 62).to_bytes(8, "little") + b'{"a": 1}')
    start = time.perf_counter()
    with pytest.raises(ValueError, match="header length 4611686018427387904 is larger than the file"):
        read_safetensors(str(path))
    assert time.perf_counter() - start < 0.5
    result = subprocess.run([sys.executable, "eval.py", "--zero-shot", "--demo", "--clip", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {path} is not a valid safetensors file: its header "
                                    "length 4611686018427387904 is larger than the file (16 bytes)")
