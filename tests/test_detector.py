"""The YOLOv3-SPP person detector stage (spec: shared/spec/detector-yolov3spp.md).

A tiny cfg written here covers parsing, the layer types, weights I/O, the ONNX path and
sharding in a user's clone. The real cfg and the coco-mini images come from ../shared.
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import COCO_MINI, SHARED, requires_shared
from tasks.detector import (CfgError, Darknet, ImageError, WeightsError, build_darknet, coco_image_list,
                            detect_image, export_darknet_onnx, onnxruntime_net_fn, parse_darknet_cfg,
                            torch_net_fn, write_detections)
from tasks.detector.darknet_cfg import (Convolutional, MaxPool, Route, Shortcut, Upsample, Yolo,
                                        parse_darknet_cfg_text)
from tasks.detector.darknet_weights import read_darknet_weights
from tasks.detector.postprocess import (coco_person_records, greedy_nms_plus1, letterbox_xyxy_to_image,
                                        person_boxes_letterbox, person_candidates_xyxy)
from tasks.detector.preprocess import letterbox_bgr_to_rgb_input, letterbox_bgr_uint8, letterbox_size
from tasks.detector.spec import YOLOV3_SPP
from tasks.detector.yolo import ZeroPadMaxPool, decode_yolo_head

REAL_CFG = SHARED / "data" / "detector" / "yolov3-spp.cfg"
COCO_MINI_ANN = COCO_MINI / "annotations" / "person_keypoints_val2017.json"

_CONV = "[convolutional]\nbatch_normalize=1\nfilters={f}\nsize={k}\nstride={s}\npad=1\nactivation=leaky\n"
_HEAD = "[convolutional]\nsize=1\nstride=1\npad=1\nfilters=21\nactivation=linear\n"
_YOLO = ("[yolo]\nmask = {m}\nanchors = 10,13,  30,61,  62,45,  59,119,  116,90,  156,198\n"
         "classes=2\nnum=6\njitter=.3\n")
# Strides 2 down to 19x19, a residual block, an SPP with zero-padded max pools, two heads
# (19x19 and, through a route / upsample / route-with-absolute-index, 38x38).
TINY_CFG = "\n".join([
    "[net]\n# training keys are ignored\nwidth=608\nheight=608\nchannels=3\nmomentum=0.9\n",
    _CONV.format(f=8, k=3, s=2), _CONV.format(f=8, k=3, s=2),                      # 0, 1
    _CONV.format(f=16, k=3, s=2), _CONV.format(f=16, k=3, s=2),                    # 2, 3
    _CONV.format(f=8, k=1, s=1), _CONV.format(f=16, k=3, s=1),                     # 4, 5
    "[shortcut]\nfrom=-3\nactivation=linear\n",                                     # 6
    _CONV.format(f=16, k=3, s=2),                                                   # 7
    "[maxpool]\nstride=1\nsize=5\n", "[route]\nlayers=-2\n",                        # 8, 9
    "[maxpool]\nstride=1\nsize=9\n", "[route]\nlayers=-1,-3,-4\n",                  # 10, 11
    _HEAD, _YOLO.format(m="3,4,5"),                                                 # 12, 13
    "[route]\nlayers = -3\n", _CONV.format(f=8, k=1, s=1),                          # 14, 15
    "[upsample]\nstride=2\n", "[route]\nlayers = -1, 6\n",                          # 16, 17
    _HEAD, _YOLO.format(m="0,1,2"),                                                 # 18, 19
])


def _convs(model: Darknet):
    return [(b, m) for b, m in zip(model.cfg.layers, model.layers) if isinstance(b, Convolutional)]


def _write_weights(path: Path, body: list[np.ndarray], version: tuple[int, int, int], seen: int) -> Path:
    """Darknet's layout, written here independently of the loader: int32 major, minor,
    revision; seen as 8 bytes from version 0.2 on, else 4; then little-endian float32."""
    wide = version[0] * 10 + version[1] >= 2
    with open(path, "wb") as f:
        f.write(np.array(version, "<i4").tobytes() + np.array([seen], "<u8" if wide else "<u4").tobytes())
        for a in body:
            f.write(np.asarray(a, "<f4").tobytes())
    return path


def _file_order(model: Darknet, params: dict) -> list[np.ndarray]:
    out = []
    for i, (block, _) in enumerate(_convs(model)):
        p = params[i]
        out += [p["beta"], p["gamma"], p["mean"], p["var"]] if block.batch_normalize else [p["bias"]]
        out.append(p["weight"])
    return out


def seeded_weights(model: Darknet, path: Path, seed: int, calib: np.ndarray,
                   version: tuple[int, int, int] = (0, 2, 0), obj_logit: float = -4.5) -> Path:
    """Seeded random weights in the real layout. The head convs are scaled on ``calib`` so
    that objectness and person logits spread across the 0.1 / best-class decisions:
    a plain random net gives near-constant maps and thousands of tied boxes.
    A lower ``obj_logit`` (the objectness logits' mean) gives fewer boxes."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (block, module) in enumerate(_convs(model)):
        w = module[0].weight
        p = {"weight": rng.normal(0, 0.65 * np.sqrt(2 / w[0].numel()), tuple(w.shape))}
        n = w.shape[0]
        if block.batch_normalize:
            p.update(beta=rng.normal(0, .1, n), gamma=rng.normal(1, .1, n), mean=rng.normal(0, .1, n),
                     var=rng.uniform(.5, 1.5, n))
        else:
            p["bias"] = np.zeros(n)
        params[i] = {k: v.astype(np.float32) for k, v in p.items()}
    _write_weights(path, _file_order(model, params), version, 0)
    net = build_darknet(model.cfg, path)
    with torch.no_grad():
        raws = net(torch.from_numpy(calib))
    heads = [i for i, (b, _) in enumerate(_convs(model)) if not b.batch_normalize]
    for i, raw in zip(heads, raws):
        r = raw[0].flatten(1).double().numpy()
        n, attrs = r.shape[0], r.shape[0] // 3
        mean, std = rng.normal(0, .3, n), np.ones(n)
        std[2::attrs] = std[3::attrs] = .4                       # w, h
        mean[4::attrs], std[4::attrs], mean[5::attrs] = obj_logit, 1.5, 2.5  # obj, person
        scale = std / (r.std(1) + 1e-12)
        params[i]["weight"] = (params[i]["weight"] * scale[:, None, None, None]).astype(np.float32)
        params[i]["bias"] = (mean - r.mean(1) * scale).astype(np.float32)
    return _write_weights(path, _file_order(model, params), version, 0)


def synthetic_image(path: Path, width: int, height: int, seed: int) -> Path:
    """Noise plus a few solid shapes, so the network sees edges at several scales."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for _ in range(6):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 80))
        cv2.rectangle(img, (x, y), (x + 40, y + 80), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
    cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny cfg with seeded weights, 3 synthetic images, and its ONNX export."""
    d = tmp_path_factory.mktemp("tiny")
    (d / "tiny.cfg").write_text(TINY_CFG)
    cfg = parse_darknet_cfg(d / "tiny.cfg")
    images = [(synthetic_image(d / f"{i:012d}.jpg", w, h, i), i)
              for i, (w, h) in zip((7, 11, 13), ((640, 427), (500, 333), (300, 620)))]
    calib = letterbox_bgr_to_rgb_input(cv2.imread(str(images[0][0])), 608)
    weights = seeded_weights(Darknet(cfg), d / "tiny.weights", seed=0, calib=calib)
    model = build_darknet(d / "tiny.cfg", weights)
    onnx_path = export_darknet_onnx(model, d / "tiny.onnx")
    return {"dir": d, "cfg": cfg, "model": model, "weights": weights, "onnx": onnx_path, "images": images}


# --- cfg -----------------------------------------------------------------------------

def test_tiny_cfg_blocks_and_output_shapes(tiny):
    layers = tiny["cfg"].layers
    assert len(layers) == 20
    assert layers[0] == Convolutional(filters=8, size=3, stride=2, pad=True, batch_normalize=True,
                                      activation="leaky")
    assert layers[6] == Shortcut(from_=-3) and layers[8] == MaxPool(size=5, stride=1)
    assert layers[11] == Route(layers=(-1, -3, -4)) and layers[17] == Route(layers=(-1, 6))
    assert layers[16] == Upsample(stride=2)
    assert layers[13] == Yolo(anchors=((59, 119), (116, 90), (156, 198)), classes=2)
    with torch.no_grad():
        outs = tiny["model"](torch.zeros(1, 3, 608, 608))
    assert [tuple(o.shape) for o in outs] == [(1, 21, 19, 19), (1, 21, 38, 38)]


def test_cfg_errors_are_one_line(tmp_path):
    for text, needle in (("[convolutional]\nfilters=1\n", "first section must be [net]"),
                         ("[net]\n[conv]\nsize=1\n", "tiny.cfg:2: unknown section [conv]"),
                         ("[net]\n[convolutional]\nsize=1\n", "tiny.cfg:2: [convolutional] lacks the key 'filters'"),
                         ("[net]\njunk\n", "tiny.cfg:2: expected")):
        with pytest.raises(CfgError) as e:
            parse_darknet_cfg_text(text, "tiny.cfg")
        assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CfgError, match="cannot read"):
        parse_darknet_cfg(tmp_path / "absent.cfg")


@requires_shared
def test_real_cfg_layers_and_output_shapes():
    cfg = parse_darknet_cfg(REAL_CFG)
    kinds = [type(b).__name__ for b in cfg.layers]
    assert len(kinds) == 114
    assert {k: kinds.count(k) for k in set(kinds)} == {
        "Convolutional": 76, "Shortcut": 23, "Route": 7, "MaxPool": 3, "Upsample": 2, "Yolo": 3}
    assert [i for i, k in enumerate(kinds) if k == "Yolo"] == [89, 101, 113]
    assert cfg.layers[83] == Route(layers=(-1, -3, -5, -6)) and cfg.layers[93] == Route(layers=(-1, 61))
    assert [h.anchors for h in cfg.yolo_heads] == [((116, 90), (156, 198), (373, 326)),
                                                  ((30, 61), (62, 45), (59, 119)),
                                                  ((10, 13), (16, 30), (33, 23))]
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = Darknet(cfg)
        outs = model(torch.empty(1, 3, 608, 608))
    assert [list(o.shape) for o in outs] == [[1, 255, 19, 19], [1, 255, 38, 38], [1, 255, 76, 76]]
    assert sum(t.numel() for t in model.tensors_in_file_order()) == 63_052_381  # spec §4.4


def test_spp_maxpool_pads_with_zeros_not_minus_inf():
    x = -torch.arange(1, 26, dtype=torch.float32).view(1, 1, 5, 5)
    out = ZeroPadMaxPool(5)(x)
    expected = torch.zeros_like(x)
    expected[0, 0, 2, 2] = -1  # the only window that does not reach the zero pad
    assert torch.equal(out, expected)
    assert not torch.equal(torch.nn.MaxPool2d(5, 1, padding=2)(x), expected)  # -inf padding (D1)


# --- weights -------------------------------------------------------------------------

@pytest.mark.parametrize("version, seen, header_bytes", [((0, 1, 0), 12345, 16), ((0, 2, 0), 2**33 + 7, 20)])
def test_weights_loader_reads_both_header_versions_in_darknet_order(tiny, tmp_path, version, seen, header_bytes):
    model = Darknet(tiny["cfg"])
    params, k = {}, 0.0
    for i, (block, module) in enumerate(_convs(model)):
        n = module[0].out_channels
        names = ["beta", "gamma", "mean", "var"] if block.batch_normalize else ["bias"]
        params[i] = {}
        for name in names:  # distinct values per slot, so a swapped slot shows
            params[i][name] = np.arange(n, dtype=np.float32) + (k := k + 1000)
        params[i]["weight"] = np.random.default_rng(i).normal(size=tuple(module[0].weight.shape))
    path = _write_weights(tmp_path / "w.weights", _file_order(model, params), version, seen)
    assert path.stat().st_size == header_bytes + 4 * 10154
    header, body, size = read_darknet_weights(path)
    assert (header.major, header.minor, header.seen, header.nbytes) == (*version[:2], seen, header_bytes)
    assert body.size == 10154 and size == path.stat().st_size
    loaded = build_darknet(tiny["dir"] / "tiny.cfg", path)
    for i, (block, module) in enumerate(_convs(loaded)):
        p = params[i]
        conv = module[0]
        assert np.array_equal(conv.weight.detach().numpy(), p["weight"].astype(np.float32))
        if block.batch_normalize:
            bn = module[1]
            assert conv.bias is None
            assert np.array_equal(bn.bias.detach().numpy(), p["beta"])  # beta first (D11)
            assert np.array_equal(bn.weight.detach().numpy(), p["gamma"])
            assert np.array_equal(bn.running_mean.numpy(), p["mean"])
            assert np.array_equal(bn.running_var.numpy(), p["var"])
        else:
            assert np.array_equal(conv.bias.detach().numpy(), p["bias"])


@pytest.mark.parametrize("delta_bytes", [-4, +4, +2])
def test_weights_of_the_wrong_size_give_one_line(tiny, tmp_path, delta_bytes):
    data = tiny["weights"].read_bytes()
    path = tmp_path / "bad.weights"
    path.write_bytes(data[:delta_bytes] if delta_bytes < 0 else data + b"\0" * delta_bytes)
    with pytest.raises(WeightsError) as e:
        build_darknet(tiny["dir"] / "tiny.cfg", path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert f"holds {10154 + delta_bytes // 4:,} float32" in msg and "needs 10,154" in msg
    assert f"expected {20 + 4 * 10154:,} bytes, got {20 + 4 * 10154 + delta_bytes:,}" in msg


def test_missing_weights_file_is_one_line(tiny, tmp_path):
    with pytest.raises(WeightsError, match="cannot read the weights"):
        build_darknet(tiny["dir"] / "tiny.cfg", tmp_path / "absent.weights")


# --- numerics ------------------------------------------------------------------------

def test_letterbox_truncates_floors_and_divides():
    assert letterbox_size(640, 425, 608) == (608, 403) and letterbox_size(500, 333, 608) == (608, 404)
    assert letterbox_size(263, 100, 608) == (607, 231)  # 263 * (608/263) = 607.999...
    bgr = np.zeros((425, 640, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue
    canvas = letterbox_bgr_uint8(bgr, 608)
    assert (canvas[:102] == 128).all() and (canvas[102 + 403:] == 128).all()  # 102 above, 103 below
    assert (canvas[102:505, :, 0] == 255).all()
    x = letterbox_bgr_to_rgb_input(bgr, 608)
    assert x.shape == (1, 3, 608, 608) and x.dtype == np.float32
    assert x[0, 0, 300, 300] == 0 and x[0, 2, 300, 300] == 1  # RGB after the resize
    assert x[0, 0, 0, 0] == np.float32(128) / np.float32(255) == np.float32(0.501960813999176)


def test_decode_layout_matches_the_worked_example():
    # Spec §8: image 785, stride-16 head, cell gx=23, gy=12, anchor 1 of (30,61) (62,45) (59,119).
    raw = torch.zeros(1, 255, 38, 38)
    for k, v in enumerate([-3.7834356, 0.7106957, -0.3611554, 1.3348397, 2.2765076, 9.1449385]):
        raw[0, 1 * 85 + k, 12, 23] = v  # channel a*85 + k, row gy, column gx
    p = decode_yolo_head(raw, Yolo(anchors=((30, 61), (62, 45), (59, 119)), classes=80), 608)
    row = p[0, (12 * 38 + 23) * 3 + 1, :6].numpy()
    assert row == pytest.approx([368.3558, 202.72888, 43.205982, 170.97241, 0.906912624835968, 0.99989319],
                                rel=1e-6)


def test_map_back_and_record_match_the_worked_example():
    corners = np.array([[346.7528076171875, 117.24267578125, 389.95880126953125, 288.215087890625,
                         0.906912624835968]], np.float32)
    records = coco_person_records(letterbox_xyxy_to_image(corners, 640, 425, 608), 785)
    assert json.dumps(records) == ('[{"category_id": 1, "score": 0.906912624835968, "bbox": '
                                   '[365.0029602050781, 15.91334342956543, 45.47998046875, '
                                   '179.97096252441406], "image_id": 785}]')


def test_map_back_uses_torchs_reciprocal_scale():
    # Upstream's ``608 / dims`` is dims.reciprocal() * 608 in torch: 1.2160001 for W=500,
    # where a float32 division gives 1.216. The right edge then maps inside the image
    # (a division would map it past 500 and clamp it to 500).
    out = letterbox_xyxy_to_image(np.array([[0, 304, 608, 304, 0.5]], np.float32), 500, 333, 608)
    assert out[0, 2] == np.float32(499.99997) and out[0, 1] == np.float32(166.5)


def _rows(boxes_obj_classes):
    """Rows ``(xc, yc, w, h, obj, p_person, p_other)`` from ``(x1, y1, x2, y2, obj, pp, po)``."""
    out = []
    for x1, y1, x2, y2, obj, pp, po in boxes_obj_classes:
        out.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, obj, pp, po])
    return np.array(out, np.float32)


def test_candidates_threshold_person_only_and_order():
    rows = _rows([(0, 0, 10, 10, 0.5, 0.9, 0.1),
                  (0, 0, 10, 10, np.float32(0.1), 0.9, 0.1),  # obj == fl32(0.1): dropped (strict >)
                  (0, 0, 10, 10, 0.9, 0.4, 0.5),               # best class is not person: dropped
                  (0, 0, 10, 10, 0.7, 0.5, 0.5),               # tie: person (index 0) wins
                  (0, 0, 10, 10, 0.3, 0.0, 0.0)])              # person prob 0: dropped
    dets = person_candidates_xyxy(rows, 0.1)
    assert dets[:, 4].tolist() == pytest.approx([0.7, 0.5])


def _reference_nms(dets, thr):
    """Scalar float32 greedy NMS, the C++ loop written out."""
    f = np.float32
    x1, y1, x2, y2, s = (dets[:, k] for k in range(5))
    areas = (x2 - x1 + f(1)) * (y2 - y1 + f(1))
    order = torch.sort(torch.from_numpy(s.copy()), descending=True)[1].tolist()
    sup = [False] * len(dets)
    for a, i in enumerate(order):
        if sup[i]:
            continue
        for j in order[a + 1:]:
            if sup[j]:
                continue
            w = max(f(0), min(x2[i], x2[j]) - max(x1[i], x1[j]) + f(1))
            h = max(f(0), min(y2[i], y2[j]) - max(y1[i], y1[j]) + f(1))
            inter = w * h
            if inter / (areas[i] + areas[j] - inter) >= f(thr):
                sup[j] = True
    return [i for i in range(len(dets)) if not sup[i]]


def test_nms_matches_scalar_reference_and_plus_one_rule():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (300, 2)).astype(np.float32)
    wh = rng.uniform(1, 60, (300, 2)).astype(np.float32)
    dets = np.concatenate([xy, xy + wh, rng.uniform(0.1, 1, (300, 1))], 1).astype(np.float32)
    dets = dets[np.argsort(-dets[:, 4], kind="stable")]
    for thr in (0.6, 0.55, 0.3):
        assert greedy_nms_plus1(dets, thr).tolist() == _reference_nms(dets, thr)
    # Two boxes that only touch still overlap by 1 px under "+1"; IoU exactly 0.6 suppresses.
    touching = np.array([[0, 0, 9, 9, .9], [9, 0, 18, 9, .8]], np.float32)  # IoU 10/190
    assert greedy_nms_plus1(touching, 0.06).tolist() == [0, 1]
    assert greedy_nms_plus1(touching, 10 / 190).tolist() == [0]
    assert greedy_nms_plus1(np.array([[0, 0, 9, 9, .9], [0, 0, 5, 9, .8]], np.float32), 0.6).tolist() == [0]


def test_more_than_100_boxes_rerun_nms_at_055():
    # Pairs of boxes with IoU 0.575 ("+1" widths 40, shifted 10.794): kept at 0.6, merged at 0.55.
    def pairs(n):
        return [box for k in range(n) for box in (
            (100.0 * k, 0, 100.0 * k + 39, 39, 0.9 - k * 1e-3, 0.9, 0.1),
            (100.0 * k + 10.794, 0, 100.0 * k + 49.794, 39, 0.85 - k * 1e-3, 0.9, 0.1))]
    lone = [(6000, 0, 6039, 39, 0.3, 0.9, 0.1)]
    assert len(person_boxes_letterbox(_rows(pairs(50)), YOLOV3_SPP)) == 100  # 100 is not > 100
    rerun = person_boxes_letterbox(_rows(pairs(50) + lone), YOLOV3_SPP)
    assert len(rerun) == 51 and rerun[:, 0].tolist() == sorted(rerun[:, 0].tolist())  # first of each pair


# --- whole images --------------------------------------------------------------------

def _run(net_fn, images, heads):
    return [r for path, image_id in images for r in detect_image(net_fn, path, image_id, heads)]


def _assert_close(got: list[dict], ref: list[dict], px: float, score: float) -> None:
    """Same records per image, in order, with boxes within ``px`` and scores within ``score``.

    Records whose scores lie within ``score`` of each other may come in either order:
    backend noise can swap near-ties (exact ties occur even with seeded weights).
    """
    assert [r["image_id"] for r in got] == [r["image_id"] for r in ref]
    for image_id in dict.fromkeys(r["image_id"] for r in ref):
        mine = [r for r in got if r["image_id"] == image_id]
        theirs = [r for r in ref if r["image_id"] == image_id]
        unused = list(range(len(theirs)))
        for g in mine:
            match = next((j for j in unused if abs(theirs[j]["score"] - g["score"]) <= score
                          and np.abs(np.subtract(theirs[j]["bbox"], g["bbox"])).max() <= px), None)
            assert match is not None, f"image {image_id}: no counterpart for {g}"
            assert all(abs(theirs[k]["score"] - g["score"]) <= score for k in unused if k < match)
            unused.remove(match)


def test_tiny_detections_are_plausible_and_split_groups_agree(tiny):
    heads = tiny["cfg"].yolo_heads
    together = _run(torch_net_fn(tiny["model"]), tiny["images"], heads)
    assert len(together) > 20 and all(r["score"] > 0.1 for r in together)
    # Two "devices": separate models from the same file, half the images each.
    first = _run(torch_net_fn(build_darknet(tiny["dir"] / "tiny.cfg", tiny["weights"])), tiny["images"][:2], heads)
    second = _run(torch_net_fn(build_darknet(tiny["dir"] / "tiny.cfg", tiny["weights"])), tiny["images"][2:], heads)
    assert first + second == together
    for image_id in {r["image_id"] for r in together}:
        scores = [r["score"] for r in together if r["image_id"] == image_id]
        assert scores == sorted(scores, reverse=True)


def test_tiny_onnxruntime_matches_torch(tiny):
    heads = tiny["cfg"].yolo_heads
    ref = _run(torch_net_fn(tiny["model"]), tiny["images"], heads)
    got = _run(onnxruntime_net_fn(tiny["onnx"], intra_op_threads=2), tiny["images"], heads)
    _assert_close(got, ref, px=0.05, score=1e-4)


def test_unreadable_image_is_one_line(tiny, tmp_path):
    bad = tmp_path / "000000000001.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(ImageError, match="cannot be decoded as an image"):
        detect_image(torch_net_fn(tiny["model"]), bad, 1, tiny["cfg"].yolo_heads)
    cut = tmp_path / "000000000002.jpg"  # libjpeg would pad it with grey and detect on that
    cut.write_bytes(Path(tiny["images"][0][0]).read_bytes()[:4000])
    with pytest.raises(ImageError, match="truncated JPEG"):
        detect_image(torch_net_fn(tiny["model"]), cut, 2, tiny["cfg"].yolo_heads)


def test_write_detections_is_upstreams_json_and_atomic(tmp_path):
    records = coco_person_records(np.array([[1.5, 2.25, 10, 20, 0.75]], np.float32), 42)
    path = tmp_path / "out" / "dets.json"
    path.parent.mkdir()
    path.write_text("stale")
    write_detections(path, records)
    assert path.read_text() == json.dumps(records) and not path.read_text().endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["dets.json"]  # no temp file left
    write_detections(path, [])
    assert path.read_text() == "[]"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real cfg with seeded random weights, on two coco-mini images (slow: ~250 MB)."""
    if not (REAL_CFG.is_file() and COCO_MINI_ANN.is_file()):
        pytest.skip("../shared (reference data) is absent: a user's clone has none")
    d = tmp_path_factory.mktemp("real")
    images = coco_image_list(COCO_MINI_ANN, COCO_MINI / "val2017")
    assert [i for _, i in images] == [785, 40083, 196141, 197388]
    images = images[:2]  # 640x425 and 500x333: both letterbox offsets and scales differ
    calib = letterbox_bgr_to_rgb_input(cv2.imread(str(images[0][0])), 608)
    weights = seeded_weights(Darknet(parse_darknet_cfg(REAL_CFG)), d / "yolov3-spp.weights", 0, calib)
    assert weights.stat().st_size == 252_209_544  # spec §4.4
    model = build_darknet(REAL_CFG, weights)
    return {"model": model, "images": images, "onnx": export_darknet_onnx(model, d / "yolov3-spp.onnx")}


def test_real_cfg_onnxruntime_matches_torch_on_coco_mini(real):
    heads = real["model"].cfg.yolo_heads
    ref = _run(torch_net_fn(real["model"]), real["images"], heads)
    assert 10 < len(ref)
    got = _run(onnxruntime_net_fn(real["onnx"], intra_op_threads=2), real["images"], heads)
    _assert_close(got, ref, px=0.05, score=1e-4)


def test_detect_cli_writes_upstreams_file(tiny, tmp_path):
    """``python -m runner detect`` on a COCO root of the tiny set equals the per-image API."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for path, image_id in tiny["images"]:
        shutil.copy(path, root / "val2017" / path.name)
        images.append({"id": image_id, "file_name": path.name})
    ann = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    (root / "annotations" / "person_keypoints_val2017.json").write_text(json.dumps(ann))
    out = tmp_path / "dets.json"
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "runner", "detect", "--dataroot", str(root),
                           "--weights", str(tiny["weights"]), "--cfg", str(tiny["dir"] / "tiny.cfg"),
                           "--out", str(out), "--threads", "2", "--quiet"],
                          env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the CLI ran: torch's CPU sums depend on the thread count
    try:
        expected = _run(torch_net_fn(tiny["model"]), sorted(tiny["images"], key=lambda t: t[1]),
                        tiny["cfg"].yolo_heads)
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(expected))
    missing = subprocess.run([sys.executable, "-m", "runner", "detect", "--dataroot", str(root), "--weights",
                              str(tmp_path / "no.weights"), "--cfg", str(tiny["dir"] / "tiny.cfg"), "--out",
                              str(tmp_path / "x.json")], env=dict(os.environ, PYTHONPATH=str(repo)),
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "no.weights: --weights not found" in missing.stderr


@pytest.mark.parametrize("api", ["new", "old"])
def test_tiny_om_through_fake_ais_bench_equals_onnxruntime(tiny, tmp_path, monkeypatch, api):
    """The detector's OM path (static batch 1, ATC, ais_bench) against the fakes, in both API versions.

    The fake session runs the ONNX behind the fake OM with ONNX Runtime, so the records
    must equal ONNX Runtime's on that ONNX exactly: this checks the plumbing (input
    bytes, three outputs by position, their shapes), not NPU numerics.
    """
    import os
    import sys

    from tasks.atc import convert_to_om
    from tasks.backends.sessions import OmModelError
    from tasks.detector.om_runtime import DetectorOm

    fakes = Path(__file__).resolve().parent / "fakes"
    monkeypatch.setenv("PATH", f"{fakes / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_AIS_BENCH_API", api)
    monkeypatch.delenv("FAKE_ASCEND_SOC", raising=False)
    monkeypatch.syspath_prepend(str(fakes))
    for name in [m for m in sys.modules if m == "aclruntime" or m.split(".")[0] == "ais_bench"]:
        monkeypatch.delitem(sys.modules, name)
    onnx = export_darknet_onnx(tiny["model"], tmp_path / "tiny-b1.onnx", batch_size=1)
    om = convert_to_om(onnx, tmp_path, "Ascend310P3", batch_size=1, input_name="input", input_chw=(3, 608, 608))
    heads = tiny["cfg"].yolo_heads
    session = DetectorOm(om, "npu:0", heads)
    try:
        got = _run(session, tiny["images"], heads)
    finally:
        session.close()
    ref = _run(onnxruntime_net_fn(onnx, intra_op_threads=1), tiny["images"], heads)
    assert len(ref) > 20 and got == ref
    # An OM of another input size is refused in one line that says how to convert it.
    other = convert_to_om(onnx, tmp_path, "Ascend310P3", batch_size=1, input_name="input", input_chw=(3, 416, 416))
    with pytest.raises(OmModelError) as e:
        DetectorOm(other, "npu:0", heads)
    assert "\n" not in str(e.value) and "takes float32 [1, 3, 416, 416]" in str(e.value)
    assert "input_chw=(3, 608, 608)" in str(e.value)
    for name in [m for m in sys.modules if m == "aclruntime" or m.split(".")[0] == "ais_bench"]:
        del sys.modules[name]  # the next test imports its own version
