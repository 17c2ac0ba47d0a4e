"""Hostile and malformed files (issue 11, part B), built small and by hand, shared by
``tests/reliability/test_untrusted_files.py`` (unit tests of the bounds) and
``tests/reliability/test_bad_inputs.py`` (the table)."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------- YAML


def yaml_alias_bomb(path: Path) -> Path:
    """A 'billion laughs' config: 9 levels of 9 aliases in 432 bytes, 9**9 strings once expanded."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


def yaml_binary(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def yaml_deep(path: Path, depth: int = 5000) -> Path:
    path.write_text("optim: " + "[" * depth + "]" * depth + "\n")
    return path


def yaml_bigint(path: Path) -> Path:
    path.write_text("optim:\n  epochs: " + "9" * 5000 + "\n")
    return path


def yaml_huge(path: Path, size: int = 1 << 20) -> Path:
    line = "# " + "x" * 77 + "\n"
    path.write_text("name: huge\n" + line * (size // len(line) + 1))
    return path


# --------------------------------------------------------------------------------------------- ONNX


def onnx_encoder(
    path: Path,
    size: int = 4,
    meta: dict | None = None,
    one_d: bool = False,
    input_size: int | None = None,
    nan: bool = False,
) -> Path:
    """A hand-made simsiam-kit 'encoder' (per-channel mean of the input, D = 3). ``meta`` overrides
    metadata_props; ``one_d``: the output is (N,) instead of (N, 3); ``input_size``: the graph's
    spatial size when it differs from the metadata's; ``nan``: the output is divided by zero (inf, or NaN
    where the mean is 0)."""
    import onnx
    from onnx import TensorProto, helper

    s = input_size or size
    if one_d:
        axes = helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3])
        nodes = [helper.make_node("ReduceMean", ["images", "axes"], ["embeddings"], keepdims=0)]
        out_shape, inits = ["batch"], [axes]
    else:
        nodes = [
            helper.make_node("GlobalAveragePool", ["images"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat" if nan else "embeddings"], axis=1),
        ]
        out_shape, inits = ["batch", 3], []
        if nan:
            inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
            nodes.append(helper.make_node("Div", ["flat", "zero"], ["embeddings"]))
    g = helper.make_graph(
        nodes,
        "mean_pool",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, s, s])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    props = {
        "format": "simsiam-kit-onnx-encoder",
        "image_size": str(size),
        "mean": "[0.5, 0.5, 0.5]",
        "std": "[0.25, 0.5, 1.0]",
        "channel_order": "RGB",
        "embedding_dim": "3",
        "input_name": "images",
        "output_name": "embeddings",
        **(meta or {}),
    }
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


# --------------------------------------------------------------------------------------------- pickles


class Foreign:
    """A class of another module: unpickling it would import and instantiate ``reliability.hostile.Foreign``."""

    def __init__(self, note: str = "x"):
        self.note = note


def _weights_like(value) -> dict:
    return {
        "model": {"stem.conv1.weight": np.zeros((2, 3), np.float32), "res2.0.conv1.weight": value},
        "__author__": "someone",
        "matching_heuristics": True,
    }


def _call_pickle(module: str, name: str, *args) -> bytes:
    """``{"model": {"w": module.name(*args)}}`` as a malicious ``__reduce__`` pickles it (written by hand:
    the pickler would check the global against the function a test has replaced)."""
    call = b"c" + f"{module}\n{name}\n".encode() + pickle.dumps(args, protocol=2)[2:-1] + b"R"
    return b"\x80\x02}X\x05\x00\x00\x00model}X\x01\x00\x00\x00w" + call + b"ss."


def pickle_os_system(path: Path, marker: Path) -> Path:
    """``os.system("touch MARKER")`` through ``__reduce__`` (on Linux the global is ``posix.system``)."""
    path.write_bytes(_call_pickle("nt" if os.name == "nt" else "posix", "system", f"touch {marker}"))
    return path


def pickle_eval(path: Path, marker: Path) -> Path:
    """``builtins.eval`` of code that would create MARKER."""
    path.write_bytes(_call_pickle("builtins", "eval", f"open({str(marker)!r}, 'w').close()"))
    return path


def pickle_foreign_class(path: Path) -> Path:
    path.write_bytes(pickle.dumps(_weights_like(Foreign()), protocol=5))
    return path


def pickle_object_array(path: Path) -> Path:
    path.write_bytes(pickle.dumps(_weights_like(np.array([1, "a", None], dtype=object)), protocol=2))
    return path


def pickle_bytes8_bomb(path: Path) -> Path:
    """19 bytes that declare a 1 TiB bytes object (BINBYTES8)."""
    path.write_bytes(b"\x80\x05\x8e" + struct.pack("<Q", 1 << 40) + b"xx.")
    return path


def pickle_reconstruct_huge(path: Path) -> Path:
    """``numpy.core.multiarray._reconstruct(ndarray, (2**30,), b'b')``: an array of 1 GiB from 100 bytes."""
    path.write_bytes(
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85"
        b"c_codecs\nencode\nX\x01\x00\x00\x00bX\x06\x00\x00\x00latin1\x86R\x87R."
    )
    return path


def pickle_persistent_id(path: Path) -> Path:
    path.write_bytes(b"\x80\x02}X\x05\x00\x00\x00modelX\x03\x00\x00\x00pidQs.")  # {"model": persistent_load("pid")}
    return path


def pickle_py2_numpy(path: Path) -> tuple[Path, np.ndarray]:
    """How Python 2 pickled ``{"blobs": {"w": float32 array}}`` (protocol 2, str as SHORT_BINSTRING)."""
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    raw = a.tobytes()
    dtype = b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    arr = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01K\x02K\x03\x86" + dtype + b"\x89U" + bytes([len(raw)]) + raw + b"tb"
    )
    path.write_bytes(b"\x80\x02}U\x05blobs}U\x01w" + arr + b"ss.")
    return path, a


# --------------------------------------------------------------------------------------------- npy / faiss


def npy_declaring(path: Path, shape: tuple, descr: str = "<f4") -> Path:
    """A .npy whose header declares ``shape`` but which holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
    return path


def patch_bytes(path: Path, offset: int, data: bytes) -> Path:
    b = bytearray(path.read_bytes())
    b[offset : offset + len(data)] = data
    path.write_bytes(bytes(b))
    return path


#: offsets in an ``IndexFlatIP`` file: fourcc (4), d (int32), ntotal (int64), 2 x int64, is_trained (1),
#: metric (int32), then the uint64 count of floats
FLAT_NTOTAL_OFFSET = 8
FLAT_COUNT_OFFSET = 37


def set_json(path: Path, **changes) -> Path:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))
    return path
