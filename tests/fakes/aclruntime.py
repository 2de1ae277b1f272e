"""A strict stand-in for Huawei's ``aclruntime`` extension (spec ascend.md §1.3-§1.8), in the builds users have.

No NPU here, so the "OM" is a fake one that ``tests/fakes/bin/atc`` writes
(``tests/fakes/fake_om.py``): a JSON header line with the ONNX it came from and its
input shape (static batch, or -1 with gears), then that ONNX's bytes, so that it is
self-contained as a real OM is (it opens on a node that cannot see the ONNX). The
session runs those bytes with ONNX Runtime on the CPU, so its outputs are real
numbers, and keeps the rules the C++ side enforces:

* each input buffer's byte count must equal the descriptor's ``realsize``, else it
  logs ``check i:<n> name:<x> in size:<got> needsize:<want> not match`` and raises
  ``RuntimeError`` (a float64 input trips it too: only bytes are compared);
* inputs are read as raw memory from the address ``BaseTensor`` was given, as
  ``aclruntime.BaseTensor(ptr, nbytes)`` does: a non-contiguous array is garbage;
* a dynamic-batch OM runs only after a gear was selected, and only a listed gear;
* ``sumary().exec_time_list`` is pybind's ``def_readwrite`` of a C++ vector of
  float32: every read builds a new Python list of every execution so far, until
  ``reset_sumaryinfo()`` clears it.

The build is ``FAKE_AIS_BENCH_API`` (aclruntime and ais_bench are built from one
source tree, so this module and the fake ais_bench read the same variable). The
builds follow ait's history (sync-ait, ``ait/components/benchmark``; docs/ascend.md):

| build | from | exec_time_list | context made current | free_resource |
|---|---|---|---|---|
| ``old`` | the 2023 Ascend/tools mirror | durations | by the constructor only | no |
| ``ait-nomodes`` | ait 2023-05 .. 2023-09-04 (076e2e916) | durations | by the constructor only | no |
| ``ait`` | ait 2023-09-11 (68d6db94b) .. 2023-10-09 | durations | on every call | yes |
| ``ait-pairs`` | ait 2023-10-09 (8c67f6f51) .. 2023-10-23 | (start, end) pairs | on every call | yes |
| ``new`` | ais_bench 2024-09 on | (start, end) pairs | on every call | yes |

A duration is one execution's ms (``std::vector<float>``); a pair is
``(start_ms, end_ms)``, ms since the session was created (float32). Where the
context is made current only by the constructor (and destructor), an execution from
another thread fails as ACL does without a current context
(``ACL_ERROR_RT_CONTEXT_NULL``, 107002; the message text is the fake's own, no real
build was seen printing it). Without ``free_resource`` the model is unloaded when
the session object is destroyed. ``new`` also refuses a model path with more than 32
``/`` (``PATH_DEPTH_MAX``, ``File::CheckFileBeforeRead``, 2024-08 on).

Like aclruntime (``Log.h``: ``ERROR_LOG`` is a ``printf``), the fake prints its
``[ERROR]`` and size-check lines on file descriptor 1 and raises only a short code.

Test knobs (not in aclruntime): ``FAKE_ACL_CONTEXT`` = ``thread`` | ``call`` overrides
the generation's context rule; ``FAKE_ACL_EXEC_MS``, when set, is the time every
execution takes on the "device" and is recorded as taking, so a test knows the device
seconds to expect; ``FAKE_ACL_RATE``, when set, is the device's speed in network inputs
per second: an execution of a batch of n takes n / rate and returns ``RATE_FILL`` everywhere, without
running the ONNX (throughput runs at NPU speeds). Either way that time is spent inside
a C call that keeps Python's GIL, as aclruntime's ``run``/``infer`` do (their pybind
binding has no ``gil_scoped_release``): no other thread of the process runs Python
meanwhile. (The ONNX Runtime compute that makes the real numbers releases the GIL,
which the fake cannot prevent; with neither knob set that compute is the only time.)
``loaded_models()`` counts the models this process holds loaded.
``FAKE_ASCEND_SOC``, when set, is the chip this "host" has: an OM built for another
soc_version fails to load like a real one does (spec §1.9). ``FAKE_ACL_LOG``, when
set, is a file where each session appends one JSON line: pid, device_id, the
ASCEND_RT_VISIBLE_DEVICES its process saw (what a Ray NPU actor was given) and
``chip``, the logical id of the chip that device id opens (the visible list's entry
at device_id, or device_id itself when the variable is unset).
``FAKE_ACL_OPEN_ERROR``, when set, makes every session fail to open: the text is
printed on fd 1 after ``[ERROR] ``, and ``RuntimeError("[1][ACL:invalid parameter]")`` raised.
``FAKE_ACL_RUN_LOG``, when set, is a file where each execution call appends one JSON
line: pid, model and the batch it ran at (the selected gear of a dynamic-batch OM).
``FAKE_ACL_FREE_DIR``, when set, is a folder where each unloaded model leaves one file
(pid, model, how it was unloaded), so a test in another process sees who freed what.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import enum
import json
import os
import threading
import time
from array import array

import numpy as np

try:
    from fake_om import FakeOmError, read_fake_om
except ImportError:  # this file loaded by its path, tests/fakes not on sys.path (tests/test_host_work.py)
    import importlib.util

    _spec = importlib.util.spec_from_file_location("fake_om", os.path.join(os.path.dirname(__file__), "fake_om.py"))
    _fake_om = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_fake_om)
    FakeOmError, read_fake_om = _fake_om.FakeOmError, _fake_om.read_fake_om

BUILDS = ("new", "ait-pairs", "ait", "ait-nomodes", "old")
GENERATION = os.environ.get("FAKE_AIS_BENCH_API", "new")
if GENERATION not in BUILDS:
    raise ImportError(f"FAKE_AIS_BENCH_API={GENERATION!r}: use one of {', '.join(BUILDS)}")
PAIRS = GENERATION in ("new", "ait-pairs")  # exec_time_list entries are (start, end) pairs
HAS_FREE = GENERATION in ("new", "ait-pairs", "ait")  # aclruntime has free_resource (and SetContext per call)
CONTEXT = os.environ.get("FAKE_ACL_CONTEXT") or ("call" if HAS_FREE else "thread")
if CONTEXT not in ("call", "thread"):
    raise ImportError(f"FAKE_ACL_CONTEXT={CONTEXT!r}: use call or thread")
PATH_DEPTH_MAX = 32
ACL_ERROR_RT_CONTEXT_NULL = 107002

# ACL's process-wide state: the context current on each thread (here the device id
# it belongs to) and the models loaded on the device.
_current = threading.local()
_loaded_lock = threading.Lock()
_loaded = [0]


def loaded_models() -> int:
    """Models loaded in this process and not yet unloaded (a test hook; aclruntime has no such call)."""
    return _loaded[0]


def c_log(line: str) -> None:
    """A line as aclruntime's printf writes it: on file descriptor 1, whatever Python's sys.stdout is."""
    os.write(1, (line + "\n").encode())


def _count_load(delta: int) -> None:
    with _loaded_lock:
        _loaded[0] += delta


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
    """``InferSumaryInfo``: the session returns this one object by reference, so it stays live.

    The entries are float32, as the C++ vector holds them; a read converts all of
    them to a new list (of tuples for pairs), an assignment replaces them.
    """

    def __init__(self) -> None:
        self._starts = array("f")
        self._ends = array("f")  # the durations, in a 2023 build

    @property
    def exec_time_list(self) -> list:
        if PAIRS:
            return list(zip(self._starts, self._ends))
        return list(self._ends)

    @exec_time_list.setter
    def exec_time_list(self, entries: list) -> None:
        self.clear()
        for entry in entries:
            if PAIRS:
                self.record(*entry)
            else:
                self.record(0.0, entry)

    # pybind11 documents a def_readwrite member with its C++ type's Python form.
    exec_time_list = property(exec_time_list.fget, exec_time_list.fset, doc="(self: aclruntime.sumary) -> " + (
        "List[Tuple[float, float]]" if PAIRS else "List[float]"))

    def record(self, start_ms: float, end_ms: float) -> None:
        """One execution: a (start, end) pair in a 2024 build, its duration before."""
        if PAIRS:
            self._starts.append(start_ms)
            self._ends.append(end_ms)
        else:
            self._ends.append(end_ms - start_ms)

    def clear(self) -> None:
        del self._starts[:], self._ends[:]


class BaseTensor:
    """A host buffer by address, as ``aclruntime.BaseTensor(ptr, nbytes)``."""

    def __init__(self, ptr: int, size: int) -> None:
        if not isinstance(ptr, int) or not isinstance(size, int):
            raise TypeError("BaseTensor(ptr: int, size: int)")
        self.ptr = ptr
        self.size = size


class Tensor:
    """An output tensor; ``np.array(t)`` after ``t.to_host()`` gives the data."""

    def __init__(self, array_: np.ndarray) -> None:
        self._array = array_
        self._on_host = False
        self.shape = list(array_.shape)

    def to_host(self) -> None:
        self._on_host = True

    def to_device(self, device_id: int) -> None:
        self._on_host = False

    def __array__(self, dtype=None, copy=None):
        if not self._on_host:
            raise RuntimeError("tensor is on the device: call to_host() first")
        return self._array if dtype is None else self._array.astype(dtype)


class _Session2023:
    """``aclruntime.InferenceSession`` before ``free_resource`` (``old``, ``ait-nomodes``)."""

    def __init__(self, model_path: str, device_id: int, options: session_options) -> None:
        if not isinstance(model_path, str) or not isinstance(device_id, int):
            raise TypeError("InferenceSession(model_path: str, device_id: int, options: session_options)")
        self._check_model_path(model_path)
        _current.device = device_id  # Init(): SetContext on the constructing thread
        self._created_ms = time.time() * 1000
        self._options = options
        self._sumary = sumary()
        self._loaded = False
        self.device_id = device_id
        visible = os.environ.get("ASCEND_RT_VISIBLE_DEVICES")
        if os.environ.get("FAKE_ACL_LOG"):
            with open(os.environ["FAKE_ACL_LOG"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "device_id": device_id, "model": model_path,
                                    "visible": visible, "chip": _chip(visible, device_id)}) + "\n")
        if os.environ.get("FAKE_ACL_OPEN_ERROR"):
            c_log(f"[ERROR] {os.environ['FAKE_ACL_OPEN_ERROR']}")
            raise RuntimeError("[1][ACL:invalid parameter]")
        self.om, onnx = _load_om(model_path)
        self.om_path = model_path
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._ort = ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])  # the OM's own bytes
        del onnx
        self._loaded = True
        _count_load(+1)
        self.gears = self.om.get("gears")
        self._gear = None  # the selected batch of a dynamic-batch OM
        (inp,) = self._ort.get_inputs()
        if inp.name != self.om["input_name"]:
            raise RuntimeError(f"fake OM input {self.om['input_name']!r} is not the ONNX input {inp.name!r}")
        self._in_dtype = _ONNX[inp.type]
        self._out = [(o.name, _ONNX[o.type], o.shape[1:]) for o in self._ort.get_outputs()]

    def _check_model_path(self, model_path: str) -> None:
        """The 2023 builds check nothing in C++ (the 2024 one does)."""

    def __del__(self) -> None:
        # ~PyInferenceSession -> Destroy(): SetContext, then unload, on whatever thread drops the last reference.
        self._unload("destroyed")

    def _unload(self, how: str = "free_resource") -> None:
        if getattr(self, "_loaded", False):
            self._loaded = False
            self._ort = None
            _count_load(-1)
            _record_free(self.om_path, how)

    def _enter(self) -> None:
        """What a call needs: the context current on this thread, set by the call or not at all."""
        if CONTEXT == "call":
            _current.device = self.device_id
        elif getattr(_current, "device", None) != self.device_id:
            c_log(f"[ERROR] aclrtMalloc failed, ret={ACL_ERROR_RT_CONTEXT_NULL}: no ACL context is current on "
                  f"thread {threading.current_thread().name!r} (the session was made on another thread)")
            raise RuntimeError(f"[{ACL_ERROR_RT_CONTEXT_NULL}][fake: no current context]")

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
            c_log(f"[ERROR] set dynamic batch size {batch} failed: gears {self.gears}")
            raise RuntimeError("[1][ACL:invalid parameter]")
        self._gear = batch

    def get_max_dym_batchsize(self) -> int:
        return max(self.gears) if self.gears else 0

    # execution

    def run(self, output_names: list[str], inputs: list[BaseTensor]) -> list[Tensor]:
        if not self._loaded:
            raise RuntimeError("[1][ACL:invalid parameter]: session resources were freed")
        self._enter()
        feeds = self._feeds(inputs)
        if os.environ.get("FAKE_ACL_RUN_LOG"):
            with open(os.environ["FAKE_ACL_RUN_LOG"], "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "model": self.om_path, "batch": self._batch(True),
                                    "dynamic": self.om["input_shape"][0] == -1}) + "\n")
        outputs = None
        device_ms = self._device_ms()
        for _ in range(self._options.loop):
            start = time.time() * 1000 - self._created_ms
            if os.environ.get("FAKE_ACL_RATE"):
                outputs = [np.full((self._batch(True), *shape), RATE_FILL, _NUMPY[kind])
                           for _, kind, shape in self._out]
            else:
                outputs = self._ort.run(None, feeds)
            if device_ms is not None:
                # the device's time, GIL held: aclruntime's binding never releases it during an execution
                _hold_gil(device_ms / 1000)
            end = start + device_ms if device_ms is not None else time.time() * 1000 - self._created_ms
            self._sumary.record(start, end)
        return [Tensor(np.ascontiguousarray(o)) for o in outputs]

    def _device_ms(self) -> float | None:
        """The ms an execution stands for (FAKE_ACL_EXEC_MS, or the batch at FAKE_ACL_RATE); None: ORT's own."""
        if os.environ.get("FAKE_ACL_EXEC_MS"):
            return float(os.environ["FAKE_ACL_EXEC_MS"])
        if os.environ.get("FAKE_ACL_RATE"):
            return self._batch(True) / float(os.environ["FAKE_ACL_RATE"]) * 1000
        return None

    def _feeds(self, inputs: list[BaseTensor]) -> dict[str, np.ndarray]:
        descs = self.get_inputs()
        if len(inputs) != len(descs):
            raise RuntimeError(f"input count {len(inputs)} != model input count {len(descs)}")
        if self.om["input_shape"][0] == -1 and self._gear is None:
            c_log("[ERROR] dynamic batch model: no batch gear selected")
            raise RuntimeError("[1][ACL:invalid parameter]")
        feeds = {}
        for i, (tensor, desc) in enumerate(zip(inputs, descs)):
            if not isinstance(tensor, BaseTensor):
                raise TypeError(f"input {i}: expected BaseTensor, got {type(tensor)}")
            if tensor.size != desc.realsize:
                c_log(f"check i:{i} name:{desc.name} in size:{tensor.size} needsize:{desc.realsize} not match")
                raise RuntimeError("[1][ACL:general failure]")
            if os.environ.get("FAKE_ACL_RATE"):
                continue  # nothing computes on the input: its bytes need not be read
            raw = ctypes.string_at(tensor.ptr, tensor.size)
            kind = np.dtype(_NUMPY[desc.datatype])
            feeds[desc.name] = np.frombuffer(raw, kind).reshape(self._batch(True), *desc.shape[1:])
        return feeds

    def sumary(self) -> sumary:
        return self._sumary

    def reset_sumaryinfo(self) -> None:
        self._sumary.clear()

    @staticmethod
    def finalize() -> None:
        pass


class _SessionFree(_Session2023):
    """``aclruntime.InferenceSession`` of ait from 2023-09-11 on (``ait``, ``ait-pairs``): ``free_resource()``."""

    def free_resource(self) -> None:
        self._unload()


class _Session2024(_SessionFree):
    """``aclruntime.InferenceSession`` of the 2024+ builds (``new``): the model path's depth is checked."""

    def _check_model_path(self, model_path: str) -> None:
        # File::CheckFileBeforeRead: the rest of its rules the Python wrapper checks first.
        depth = os.path.abspath(model_path).count("/")
        if depth > PATH_DEPTH_MAX:
            c_log(f"[ERROR] path depth invalid ({depth} > {PATH_DEPTH_MAX})")
            c_log("[ERROR] model path illegal, please check.")
            raise RuntimeError("please check model path")


_LIBC = ctypes.PyDLL(ctypes.util.find_library("c"))
#: What every output holds at FAKE_ACL_RATE: a very negative logit, so a detector's heads find nothing
#: (zeros would be objectness 0.5 everywhere: thousands of boxes to decode) and heatmaps peak nowhere.
RATE_FILL = -20.0


def _hold_gil(seconds: float) -> None:
    """Wait in a C call that keeps the GIL (ctypes.PyDLL does not release it), as aclruntime's execute does."""
    while seconds > 0:
        step = min(seconds, 0.5)
        _LIBC.usleep(ctypes.c_uint(int(step * 1e6)))
        seconds -= step


def _chip(visible: str | None, device_id: int) -> int | None:
    """The logical id device ``device_id`` is in a process whose ASCEND_RT_VISIBLE_DEVICES is ``visible``."""
    if visible is None:
        return device_id
    ids = [int(v) for v in visible.split(",") if v.strip().isdigit()]
    return ids[device_id] if device_id < len(ids) else None


def _record_free(model_path: str, how: str) -> None:
    folder = os.environ.get("FAKE_ACL_FREE_DIR")
    if folder:
        name = f"{os.getpid()}-{time.monotonic_ns()}-{threading.get_ident()}.json"
        with open(os.path.join(folder, name), "w") as f:
            json.dump({"pid": os.getpid(), "model": model_path, "how": how}, f)


InferenceSession = {"new": _Session2024, "ait-pairs": _SessionFree, "ait": _SessionFree}.get(GENERATION, _Session2023)


def _load_om(path: str) -> tuple[dict, bytes]:
    """The fake OM's header and the ONNX bytes it holds (it never opens the ONNX the header names)."""
    try:
        om, onnx = read_fake_om(path)
    except (OSError, FakeOmError) as e:
        c_log(f"[ERROR] load model from file failed, model file is {path} ({e})")
        raise RuntimeError("[1][ACL:invalid parameter]") from None
    host_soc = os.environ.get("FAKE_ASCEND_SOC")
    if host_soc and host_soc != om["soc_version"]:
        c_log(f"[ERROR] load model from file failed, model file is {path} "
              f"(built for {om['soc_version']}, this chip is {host_soc})")
        raise RuntimeError("[1][ACL:invalid parameter]")
    return om, onnx
