"""A strict stand-in for Huawei's ``aclruntime`` extension (spec ascend.md §1.3, §1.4, §1.6).

No NPU here, so the "OM" is a fake one that ``tests/fakes/bin/atc`` writes: a JSON
file that names the ONNX it came from and its input shape (static batch, or -1
with gears). The session runs that ONNX with ONNX Runtime on the CPU, so its
outputs are real numbers, and keeps the rules the C++ side enforces:

* each input buffer's byte count must equal the descriptor's ``realsize``, else it
  logs ``check i:<n> name:<x> in size:<got> needsize:<want> not match`` and raises
  ``RuntimeError`` (a float64 input trips it too: only bytes are compared);
* inputs are read as raw memory from the address ``BaseTensor`` was given, as
  ``aclruntime.BaseTensor(ptr, nbytes)`` does: a non-contiguous array is garbage;
* a dynamic-batch OM runs only after a gear was selected, and only a listed gear;
* ``exec_time_list``: one ``(start_ms, end_ms)`` per execution (``loop`` per run),
  gettimeofday milliseconds since the session was created.

``FAKE_ASCEND_SOC``, when set, is the chip this "host" has: an OM built for another
soc_version fails to load like a real one does (spec §1.9). ``FAKE_ACL_LOG``, when
set, is a file where each session appends one JSON line: pid, device_id and the
ASCEND_RT_VISIBLE_DEVICES its process saw (what a Ray NPU actor was given).
"""
from __future__ import annotations

import ctypes
import enum
import json
import os
import sys
import time

import numpy as np

FAKE_OM_FORMAT = "fake-om/1"


class dtype(enum.Enum):  # noqa: N801 - the binding's name; str() is 'dtype.float32'
    int8 = 0
    uint8 = 1
    int16 = 2
    uint16 = 3
    int32 = 4
    uint32 = 5
    int64 = 6
    uint64 = 7
    float16 = 8
    float32 = 9
    double = 10
    bool = 11


_NUMPY = {dtype.float32: np.float32, dtype.float16: np.float16, dtype.double: np.float64, dtype.int64: np.int64,
          dtype.int32: np.int32, dtype.uint8: np.uint8, dtype.int8: np.int8, dtype.bool: np.bool_}
_ONNX = {"tensor(float)": dtype.float32, "tensor(float16)": dtype.float16, "tensor(double)": dtype.double,
         "tensor(int64)": dtype.int64, "tensor(int32)": dtype.int32, "tensor(uint8)": dtype.uint8}


class tensor_desc:  # noqa: N801
    def __init__(self, name: str, datatype: dtype, shape: list[int], size: int, realsize: int) -> None:
        self.name = name
        self.datatype = datatype
        self.format = 0  # NCHW
        self.shape = list(shape)
        self.size = size
        self.realsize = realsize

    def __repr__(self) -> str:
        return (f"tensor_desc(name={self.name!r}, datatype={self.datatype}, shape={self.shape}, "
                f"size={self.size}, realsize={self.realsize})")


class session_options:  # noqa: N801
    def __init__(self) -> None:
        self.loop = 1
        self.log_level = 2
        self.acl_json_path = ""


class sumary:  # noqa: N801 - the binding's spelling
    def __init__(self, exec_time_list: list[tuple[float, float]]) -> None:
        self.exec_time_list = list(exec_time_list)


class BaseTensor:
    """A host buffer by address, as ``aclruntime.BaseTensor(ptr, nbytes)``."""

    def __init__(self, ptr: int, size: int) -> None:
        if not isinstance(ptr, int) or not isinstance(size, int):
            raise TypeError("BaseTensor(ptr: int, size: int)")
        self.ptr = ptr
        self.size = size


class Tensor:
    """An output tensor; ``np.array(t)`` after ``t.to_host()`` gives the data."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self._on_host = False
        self.shape = list(array.shape)

    def to_host(self) -> None:
        self._on_host = True

    def to_device(self, device_id: int) -> None:
        self._on_host = False

    def __array__(self, dtype=None, copy=None):
        if not self._on_host:
            raise RuntimeError("tensor is on the device: call to_host() first")
        return self._array if dtype is None else self._array.astype(dtype)


class InferenceSession:
    def __init__(self, model_path: str, device_id: int, options: session_options) -> None:
        if not isinstance(model_path, str) or not isinstance(device_id, int):
            raise TypeError("InferenceSession(model_path: str, device_id: int, options: session_options)")
        self._created_ms = time.time() * 1000
        self._options = options
        self._exec: list[tuple[float, float]] = []
        self._freed = False
        self.device_id = device_id
        if os.environ.get("FAKE_ACL_LOG"):
            with open(os.environ["FAKE_ACL_LOG"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "device_id": device_id, "model": model_path,
                                    "visible": os.environ.get("ASCEND_RT_VISIBLE_DEVICES")}) + "\n")
        self.om = _load_om(model_path)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._ort = ort.InferenceSession(self.om["onnx"], opts, providers=["CPUExecutionProvider"])
        self.gears = self.om.get("gears")
        self._gear = None  # the selected batch of a dynamic-batch OM
        (inp,) = self._ort.get_inputs()
        if inp.name != self.om["input_name"]:
            raise RuntimeError(f"fake OM input {self.om['input_name']!r} is not the ONNX input {inp.name!r}")
        self._in_dtype = _ONNX[inp.type]
        self._out = [(o.name, _ONNX[o.type], o.shape[1:]) for o in self._ort.get_outputs()]

    # descriptors

    def _batch(self, current: bool) -> int:
        shape = self.om["input_shape"]
        if shape[0] != -1:
            return shape[0]
        return self._gear if current and self._gear is not None else max(self.gears)

    def get_inputs(self) -> list[tensor_desc]:
        shape = self.om["input_shape"]
        per = int(np.prod(shape[1:])) * np.dtype(_NUMPY[self._in_dtype]).itemsize
        # aclruntime hides the gear-selector input ATC adds to a dynamic-batch OM.
        return [tensor_desc(self.om["input_name"], self._in_dtype, shape, per * self._batch(False),
                            per * self._batch(True))]

    def get_outputs(self) -> list[tensor_desc]:
        descs = []
        for name, kind, dims in self._out:
            per = int(np.prod(dims)) * np.dtype(_NUMPY[kind]).itemsize
            # ATC renames outputs (spec §1.3): address them by position.
            descs.append(tensor_desc(f"fake_out:0:{name}", kind, [self._batch(False), *dims],
                                     per * self._batch(False), per * self._batch(True)))
        return descs

    # gears

    def set_staticbatch(self) -> None:
        self._gear = None

    def set_dynamic_batchsize(self, batch: int) -> None:
        if not isinstance(batch, int):
            raise TypeError(f"set_dynamic_batchsize(): incompatible function arguments: {batch!r}")
        if self.gears is None or batch not in self.gears:
            print(f"[ERROR] set dynamic batch size {batch} failed: gears {self.gears}", file=sys.stderr)
            raise RuntimeError("[1][ACL:invalid parameter]")
        self._gear = batch

    def get_max_dym_batchsize(self) -> int:
        return max(self.gears) if self.gears else 0

    # execution

    def run(self, output_names: list[str], inputs: list[BaseTensor]) -> list[Tensor]:
        if self._freed:
            raise RuntimeError("[1][ACL:invalid parameter]: session resources were freed")
        descs = self.get_inputs()
        if len(inputs) != len(descs):
            raise RuntimeError(f"input count {len(inputs)} != model input count {len(descs)}")
        if self.om["input_shape"][0] == -1 and self._gear is None:
            print("[ERROR] dynamic batch model: no batch gear selected", file=sys.stderr)
            raise RuntimeError("[1][ACL:invalid parameter]")
        feeds = {}
        for i, (tensor, desc) in enumerate(zip(inputs, descs)):
            if not isinstance(tensor, BaseTensor):
                raise TypeError(f"input {i}: expected BaseTensor, got {type(tensor)}")
            if tensor.size != desc.realsize:
                print(f"check i:{i} name:{desc.name} in size:{tensor.size} needsize:{desc.realsize} not match",
                      file=sys.stderr)
                raise RuntimeError("[1][ACL:general failure]")
            raw = ctypes.string_at(tensor.ptr, tensor.size)
            kind = np.dtype(_NUMPY[desc.datatype])
            feeds[desc.name] = np.frombuffer(raw, kind).reshape(self._batch(True), *desc.shape[1:])
        outputs = None
        for _ in range(self._options.loop):
            start = time.time() * 1000 - self._created_ms
            outputs = self._ort.run(None, feeds)
            self._exec.append((start, time.time() * 1000 - self._created_ms))
        return [Tensor(np.ascontiguousarray(o)) for o in outputs]

    def sumary(self) -> sumary:
        return sumary(self._exec)

    def reset_sumaryinfo(self) -> None:
        self._exec.clear()

    def free_resource(self) -> None:
        self._freed = True
        self._ort = None

    @staticmethod
    def finalize() -> None:
        pass


def _load_om(path: str) -> dict:
    try:
        with open(path) as f:
            om = json.load(f)
        if om.get("format") != FAKE_OM_FORMAT:
            raise ValueError(om.get("format"))
    except (OSError, ValueError) as e:
        print(f"[ERROR] load model from file failed, model file is {path} ({e})", file=sys.stderr)
        raise RuntimeError("[1][ACL:invalid parameter]") from None
    host_soc = os.environ.get("FAKE_ASCEND_SOC")
    if host_soc and host_soc != om["soc_version"]:
        print(f"[ERROR] load model from file failed, model file is {path} "
              f"(built for {om['soc_version']}, this chip is {host_soc})", file=sys.stderr)
        raise RuntimeError("[1][ACL:invalid parameter]")
    return om
