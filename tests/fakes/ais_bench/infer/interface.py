"""Fake ``ais_bench.infer.interface.InferSession`` in the builds users have (spec ascend.md §1; docs/ascend.md).

``FAKE_AIS_BENCH_API`` (read at import, by the fake ``aclruntime`` too) picks one; the
dates are ait's (sync-ait ``ait/components/benchmark/ais_bench/infer/interface.py``):

* ``new`` (ais_bench 2024-09 onward, built from source): model-file and argument
  checks before any device work, ``infer(feeds, mode='static', custom_sizes=100000,
  out_array=True)`` dispatching through the mode table ``infer_mode_switch``
  (static/dymbatch/dymhw/dymdims/dymshape; another mode raises), ``summary()`` /
  ``reset_summaryinfo()`` (ait aca9c296d, 2023-10-23), ``(start_ms, end_ms)`` pairs,
  ``free_resource()``, static ``finalize()``.
* ``ait-pairs`` (ait 2023-10-09, 8c67f6f51, to 2023-10-23): the mode table, ``sumary()``
  / ``reset_sumaryinfo()`` whose ``exec_time_list`` holds pairs, ``free_resource()``.
* ``ait`` (ait 2023-09-11, 68d6db94b, to 2023-10-09): as ``ait-pairs`` with durations in ms.
  (ee242d5de, 2023-09-08, brought the mode table; free_resource came three days later.)
* ``ait-nomodes`` (ait 2023-05 to 2023-09-04, 076e2e916): ``infer(..., out_array=True)``
  but no mode table: ``static`` selects nothing, ``dymshape``/``dymdims`` set shapes,
  and any other mode, ``dymbatch`` included, is silently ignored, so a dynamic-batch
  OM runs only after ``set_dynamic_batchsize``. ``sumary()`` with durations, no
  ``free_resource``.
* ``old`` (the 2023 GitHub mirror of Ascend/tools): ``infer(feeds, mode='static',
  custom_sizes=100000)`` with static/dymshape/dymdims only, ``sumary()`` with
  durations, ``reset_sumaryinfo()``, no ``free_resource``; a gear is selected with
  ``set_dynamic_batchsize`` and kept by a later ``mode='static'`` call.

All wrap the fake ``aclruntime`` exactly as the real wrapper wraps the real one; in
the two 2023 versions its context belongs to the thread that made the session.
Where the 2023 sources checked nothing, the fakes are deliberately stricter (feeds
must be a list, device_id a Python int, unknown modes raise) so that a backend that
passes them also passes the lenient originals; those spots say "stricter".
"""
from __future__ import annotations

import os
import re
import stat

import aclruntime
import numpy as np

API = os.environ.get("FAKE_AIS_BENCH_API", "new")
if API not in aclruntime.BUILDS:
    raise ImportError(f"FAKE_AIS_BENCH_API={API!r}: use one of {', '.join(aclruntime.BUILDS)}")

OM_MODEL_MAX_SIZE = 10 * 1024 ** 3
_PATH_CHARS = re.compile(r"[^_A-Za-z0-9/.-]")
NP_TYPE_LIST = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.float16, np.float32,
                np.float64]


# --- argument checks of the new version (interface_check.py, path_security_check.py)

def check_model_path_legality(path) -> None:
    if not path:
        raise RuntimeError("empty model path!")
    full = os.path.abspath(path)
    if _PATH_CHARS.search(full):
        raise ValueError("The path string is illegal. Please check.")
    if not os.path.isfile(full):
        raise ValueError(f"The path:{path} is not a file.")
    st = os.stat(full)
    if os.path.islink(full):
        raise ValueError(f"The path:{path} is illegal. Please check the error log for more detail.")
    if st.st_uid != os.geteuid() and st.st_gid not in os.getgroups():
        raise ValueError(f"The path:{path} is illegal. Please check the error log for more detail.")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"The path:{path} is illegal. Please check the error log for more detail.")
    if not os.access(os.path.realpath(full), os.R_OK) or not mode & stat.S_IRUSR:
        raise ValueError(f"The path:{path} is illegal. Please check the error log for more detail.")
    if os.path.splitext(full)[1] != ".om":
        raise ValueError(f"The suffix of path:{path} not in ['om']. Please check.")
    if st.st_size > OM_MODEL_MAX_SIZE:
        raise ValueError(f"The file:{path} size is larger than {OM_MODEL_MAX_SIZE}. Please check.")


def check_device_range_valid(value) -> None:
    if not isinstance(value, int):
        raise TypeError(f"device:{value} is not a integer!")
    if value < 0 or value > 255:
        raise ValueError(f"device:{value} is illegal. legal value range is [0, 255]")


def check_list(value, max_len: int = 1024) -> None:
    if not isinstance(value, list):
        raise ValueError("the list be checked is not a list!")
    if not value:
        raise ValueError("the list is empty")
    if len(value) > max_len:
        raise ValueError(f"the list's length is over {max_len}!")


def check_custom_size(value, mode: str) -> None:
    if mode not in ("static", "dymbatch", "dymhw", "dymdims", "dymshape"):
        raise ValueError("infer mode is illegal, Please check.")
    if mode == "dymshape" and value is None:
        raise ValueError(f"custom_size:{value} dismatch with mode. Please check.")
    if value is not None and not isinstance(value, (int, list)):
        raise TypeError(f"value:{value} is not a integer!")


class _Common:
    def __init__(self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False,
                 loop: int = 1) -> None:
        self.device_id = device_id
        self.model_path = model_path
        self.loop = loop
        self.options = aclruntime.session_options()
        self.options.log_level = 1 if debug else 2
        self.options.loop = loop
        self.session = aclruntime.InferenceSession(model_path, device_id, self.options)
        self.outputs_names = [meta.name for meta in self.session.get_outputs()]

    def get_inputs(self):
        self.intensors_desc = self.session.get_inputs()
        return self.intensors_desc

    def get_outputs(self):
        self.outtensors_desc = self.session.get_outputs()
        return self.outtensors_desc

    def set_staticbatch(self) -> None:
        self.session.set_staticbatch()

    def set_dynamic_batchsize(self, dym_batch) -> None:
        self.session.set_dynamic_batchsize(dym_batch)

    def run(self, feeds, out_array: bool = False):
        if feeds and isinstance(feeds[0], np.ndarray):
            inputs = [aclruntime.BaseTensor(a.__array_interface__["data"][0], a.nbytes) for a in feeds]
        else:
            inputs = feeds
        outputs = self.session.run(self.outputs_names, inputs)
        if not out_array:
            return outputs
        for t in outputs:
            t.to_host()
        return [np.array(t) for t in outputs]


def _arrays(feeds) -> tuple[list[np.ndarray], list]:
    """The feeds as C-contiguous arrays and their shapes, as ``infer()`` of 2023-ait and 2024 prepares them."""
    inputs, shapes = [], []
    for feed in feeds:
        if isinstance(feed, np.ndarray):
            array = feed if feed.flags.c_contiguous else np.ascontiguousarray(feed)
            shapes.append(array.shape)
        elif type(feed) in NP_TYPE_LIST:
            array = np.array(feed)
            shapes.append([feed.size])
        else:
            raise RuntimeError(f"type:{type(feed)} invalid")
        inputs.append(array)
    return inputs, shapes


class _NoModesInfer(_Common):
    """``infer()`` with ``out_array`` and no mode table: ait 2023-05 to 2023-09-04."""

    def infer(self, feeds, mode="static", custom_sizes=100000, out_array=True):
        if not isinstance(feeds, list):  # stricter: the 2023 source iterated any sequence
            raise RuntimeError(f"type:{type(feeds)} invalid")
        inputs, _ = _arrays(feeds)
        if mode in ("dymshape", "dymdims"):
            raise RuntimeError(f"fake ais_bench: mode {mode!r} is valid but not modelled by this fake")
        # Any other mode, 'static' and 'dymbatch' included, sets nothing: the gear stays as it was.
        return self.run(inputs, out_array)

    def sumary(self):
        return self.session.sumary()

    def reset_sumaryinfo(self) -> None:
        self.session.reset_sumaryinfo()

    @staticmethod
    def finalize() -> None:
        if hasattr(aclruntime.InferenceSession, "finalize"):
            aclruntime.InferenceSession.finalize()


class _OutArrayInfer(_Common):
    """``infer()`` through the mode table ``infer_mode_switch``: ait from 2023-09-08, ais_bench 2024."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.infer_mode_switch = {"static": self._static_prepare, "dymbatch": self._dymbatch_prepare,
                                  "dymhw": self._not_modelled, "dymdims": self._not_modelled,
                                  "dymshape": self._not_modelled}

    def _infer(self, feeds, mode: str, out_array: bool):
        inputs, shapes = _arrays(feeds)
        prepare = self.infer_mode_switch.get(mode)
        if prepare is None:
            raise RuntimeError(f"wrong infer_mode:{mode}, only support \"static\",\"dymbatch\",\"dymhw\", "
                               "\"dymdims\",\"dymshape\"")
        prepare(shapes)
        return self.run(inputs, out_array)

    def _static_prepare(self, shapes) -> None:
        self.set_staticbatch()

    @staticmethod
    def _not_modelled(shapes) -> None:
        raise RuntimeError("fake ais_bench: this mode is valid but not modelled by this fake")

    def _dymbatch_prepare(self, shapes) -> None:
        indesc = self.get_inputs()
        if len(shapes) != len(indesc):
            raise RuntimeError("input datas and intensors nums not matched!")
        for i, shape in enumerate(shapes):
            for j, dim in enumerate(shape):
                if indesc[i].shape[j] < 0:
                    self.set_dynamic_batchsize(dim)
                    return
                if indesc[i].shape[j] != dim:
                    raise RuntimeError("input datas and intensors dim not matched!")
        raise RuntimeError("not a dymbatch model!")

    def free_resource(self) -> None:
        if hasattr(self.session, "free_resource"):
            self.session.free_resource()

    @staticmethod
    def finalize() -> None:
        if hasattr(aclruntime.InferenceSession, "finalize"):
            aclruntime.InferenceSession.finalize()


class _NewInferSession(_OutArrayInfer):
    def __init__(self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False,
                 loop: int = 1) -> None:
        check_model_path_legality(model_path)
        check_device_range_valid(device_id)
        if not isinstance(loop, int) or loop <= 0:
            raise TypeError(f"value:{loop} is not a integer!")
        super().__init__(device_id, model_path, acl_json_path, debug, loop)

    def infer(self, feeds, mode="static", custom_sizes=100000, out_array=True):
        check_list(feeds)
        if not isinstance(out_array, bool):
            raise TypeError(f"value:{out_array} is not a bool!")
        check_custom_size(custom_sizes, mode)
        return self._infer(feeds, mode, out_array)

    def summary(self):
        return self.session.sumary()

    def reset_summaryinfo(self) -> None:
        self.session.reset_sumaryinfo()


class _NoModesInferSession(_NoModesInfer):
    def __init__(self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False,
                 loop: int = 1) -> None:
        check_device_range_valid(device_id)  # stricter: the 2023 source passed it to pybind as is
        super().__init__(device_id, model_path, acl_json_path, debug, loop)


class _AitInferSession(_OutArrayInfer):
    def __init__(self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False,
                 loop: int = 1) -> None:
        check_device_range_valid(device_id)  # stricter: the 2023 source passed it to pybind as is
        super().__init__(device_id, model_path, acl_json_path, debug, loop)

    def infer(self, feeds, mode="static", custom_sizes=100000, out_array=True):
        if not isinstance(feeds, list):  # stricter: the 2023 source iterated any sequence
            raise RuntimeError(f"type:{type(feeds)} invalid")
        return self._infer(feeds, mode, out_array)

    def sumary(self):
        return self.session.sumary()

    def reset_sumaryinfo(self) -> None:
        self.session.reset_sumaryinfo()


class _OldInferSession(_Common):
    def __init__(self, device_id: int, model_path: str, acl_json_path: str = None, debug: bool = False,
                 loop: int = 1) -> None:
        check_device_range_valid(device_id)  # stricter: the 2023 source passed it to pybind as is
        super().__init__(device_id, model_path, acl_json_path, debug, loop)

    def infer(self, feeds, mode="static", custom_sizes=100000):
        if not isinstance(feeds, list):  # stricter: the 2023 source iterated any sequence
            raise RuntimeError(f"type:{type(feeds)} invalid")
        inputs = []
        for feed in feeds:
            if type(feed) is np.ndarray:
                inputs.append(feed)  # no contiguity fix in this version: raw memory is read
            elif type(feed) in NP_TYPE_LIST:
                inputs.append(np.array(feed))
            else:
                raise RuntimeError(f"type:{type(feed)} invalid")
        if mode != "static":  # stricter: dymshape/dymdims exist but are not modelled; others were ignored
            raise RuntimeError(f"fake old ais_bench: mode {mode!r} not supported (static, dymshape, dymdims)")
        return self.run(inputs, out_array=True)

    def sumary(self):
        return self.session.sumary()

    def reset_sumaryinfo(self) -> None:
        self.session.reset_sumaryinfo()

    def finalize(self) -> None:
        if hasattr(self.session, "finalize"):
            self.session.finalize()


InferSession = {"new": _NewInferSession, "ait-pairs": _AitInferSession, "ait": _AitInferSession,
                "ait-nomodes": _NoModesInferSession, "old": _OldInferSession}[API]
