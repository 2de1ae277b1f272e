"""One real box along the default run's path, file by file, against numbers worked out by hand.

The default run (``--backend auto`` on ``--devices cpu``) is ONNX Runtime with
``uint8_input`` on: a worker cuts the uint8 crop (``tasks.pipeline.prepare_batch``), hands
it and its uint8 mirror to the backend as they are (``network_inputs``), the exported
graph normalises them (``tasks.deploy``), and the two heatmap sets come back to be
flip-merged and decoded (``merge_outputs``, ``decode_keypoints``); the driver then makes
records, rescores them and runs OKS-NMS (``pose_columns``, ``nms_rows``). So the host's
``crops_to_input`` and ``flip_input`` are not on this path; they are the float-input
variant's, and the one pixel checked here is the same bits either way.

Each test is one file of that reading order: tasks/dataset.py -> tasks/transforms.py ->
the graph's normalisation (tasks/deploy.py) -> tasks/decode.py -> tasks/evaluation.py.
The box is the first detection of coco-mini (image 785, 640x425), the worked example of
docs/numerics.md#worked-example. Every expected number is a literal, with the arithmetic
that gives it beside it; none is computed by the code under test. The network is not run:
the heatmaps are made by hand, so that their peak and its neighbours are known.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import COCO_MINI, COCO_MINI_DETS, requires_shared
from tasks.variant import Variant

pytestmark = requires_shared

f32 = np.float32

# The detection, as the file holds it (entry 0, image 785).
BBOX = (277.1183158543966, 45.699667786163765, 225.09126579259754, 333.5602652943344)
BOX_SCORE = 0.9999731779098511  # = 1 - 450 * 2**-24: already a float32 value, so fl32 keeps it

# Center: x + w/2 = 277.1183158543966 + 112.54563289629877 = 389.66394875069534 -> fl32 389.6639404296875
#         y + h/2 = 45.699667786163765 + 166.7801326471672 = 212.47980043333095 -> fl32 212.47979736328125
CENTER = (389.6639404296875, 212.47979736328125)
# Widen to 0.75: 0.75 h = 250.1701989707508 > w = 225.09..., so w = 250.1701989707508 and h stays.
# Scale: fl32(w) * fl32(1.25) = 250.17020 * 1.25 = 312.71274..., fl32(h) * 1.25 = 333.56027 * 1.25 = 416.95034...
SCALE = (312.7127380371094, 416.9503479003906)
# Crop box, one rounding each: x1 = fl32(389.66394 - 156.35637) = 233.30757, x2 = fl32(x1' + 312.71274) = 546.02032
#                              y1 = fl32(212.47980 - 208.47517) = 4.0046234, y2 = fl32(y1' + 416.95035) = 420.95496
CROP_BOX = (233.3075714111328, 4.0046234130859375, 546.0203247070312, 420.9549560546875)
# (Rounding after every step, numpy 2's rule, happens to give the same four values for this box; T20.)
# Affine: k = 192 / 312.7127380371094 = 0.6139820245416914; t = (96 - k * 389.66394, 128 - k * 212.47980)
K, TX, TY = 0.6139820245416914, -143.24665503591257, -2.458776159315761

# Crop pixel (u, v) = (96, 128), the crop's centre: its source is the box centre (389.66394, 212.47980).
# Quantised to 1/32 px: 389.66394 * 32 = 12469.25 -> 12469 = 389 * 32 + 21; 212.47980 * 32 = 6799.35 -> 6799 = 212 * 32 + 15
U, V = 96, 128
IX, FX, IY, FY = 389, 21, 212, 15
# The weights: (32-21)(32-15)32 = 5984, 21(32-15)32 = 11424, (32-21)15*32 = 5280, 21*15*32 = 10080; they sum to 32768.
W00, W01, W10, W11 = 5984, 11424, 5280, 10080
# The four image pixels [212, 389], [212, 390], [213, 389], [213, 390], RGB, as OpenCV decodes the JPEG.
P00, P01, P10, P11 = (29, 7, 10), (74, 2, 6), (49, 7, 11), (35, 0, 5)
# R: (29*5984 + 74*11424 + 49*5280 + 35*10080 + 16384) >> 15 = 1646816 >> 15 = 50   (50.26)
# G: ( 7*5984 +  2*11424 +  7*5280 +  0*10080 + 16384) >> 15 =  118080 >> 15 = 3    (3.60)
# B: (10*5984 +  6*11424 + 11*5280 +  5*10080 + 16384) >> 15 =  253248 >> 15 = 7    (7.73)
CROP_VALUE = (50, 3, 7)
# Normalised, two float32 roundings: fl32(fl32(p / 255) - fl32(mean)).
#   R: fl32(50/255) = 0.19607843458652496; minus fl32(0.406) = 0.4059999883174896 -> -0.20992155373096466
#   G: fl32(3/255)  = 0.0117647061124444;  minus fl32(0.457) = 0.4569999873638153 -> -0.4452352821826935
#   B: fl32(7/255)  = 0.027450980618596077; minus fl32(0.480) = 0.47999998927116394 -> -0.452549010515213
INPUT_VALUE = (-0.20992155373096466, -0.4452352821826935, -0.452549010515213)
# One rounding (double, then fl32) gives R = -0.20992156863212585: one ulp off (docs/numerics.md#input).
INPUT_R_ONE_ROUNDING = -0.20992156863212585

# Decode: w = x2 - x1 = 312.71275329589844, h = y2 - y1 = 416.95033264160156 (double, from the float32 corners);
# c = (x1 + w/2, y1 + h/2) = (389.66394805908203, 212.47978973388672); one heatmap px = w / 48 = 6.514849026997884.
CX, CY, PX = 389.66394805908203, 212.47978973388672, 6.514849026997884
# Peak of joint 0 at heatmap (30, 21); right neighbour 0.5 > left 0.25, the one below 0.125 < the one above 0.375,
# so (30 + 0.25, 21 - 0.25) = (30.25, 20.75).
# X = 389.66394805908203 + (30.25 - 24) * 6.514849026997884 = 430.3817544778188 -> fl32 430.3817443847656
# Y = 212.47978973388672 + (20.75 - 32) * 6.514849026997884 = 139.18773818016052 -> fl32 139.187744140625
NOSE = (430.3817443847656, 139.187744140625)
# Joint 5 (left shoulder) at (10, 40), flat neighbours (no offset):
# X = 389.66394805908203 - 14 * 6.514849026997884 = 298.45606168111163; Y = 212.47978973388672 + 8 * 6.5148... = 264.5985819498698
SHOULDER = (298.45606168111163, 264.5985819498698)
# A masked joint sits at heatmap (0, 0): X = c_x - 24 px = 233.3075714111328, Y = c_y - 32 px = 4.004620869954437.
MASKED = (233.3075714111328, 4.004620869954437)
# The decode's affine is solved from float32 points, not this closed form: at most 6.1e-5 image px apart.
DECODE_TOL = 6.1e-5

# Crop-box area, double from the float32 corners: 312.71275329589844 * 416.95033264160156
AREA = 130385.68650799594
# Rescoring: maxima > 0.2 are joints 0, 1, 5 = 0.875, 0.25, 0.5 (joint 2's 0.1875 is not); summed in joint order
# (0.875 + 0.25) + 0.5 = 1.625, / 3 = 0.5416666666666666, * 0.9999731779098511 = 0.5416521380345026
RESCORED = 0.5416521380345026

UINT8 = Variant(uint8_input=True)  # what uint8_input: auto settles to for ONNX Runtime on CPU devices


@pytest.fixture(scope="module")
def box():
    from tasks.dataset import load_boxes

    box_set = load_boxes(str(COCO_MINI), str(COCO_MINI_DETS))
    return box_set.boxes[0], box_set.image_paths


@pytest.fixture(scope="module")
def image(box):
    from tasks.dataset import read_rgb

    _, paths = box
    return read_rgb(paths[785])


@pytest.fixture(scope="module")
def prepared(box, image):
    from tasks.pipeline import prepare_batch

    return prepare_batch([box[0]], {785: image})


# ------------------------------------------------------------------ 1. tasks/dataset.py


def test_dataset_gives_the_file_s_first_box_unchanged(box, image):
    b, _ = box
    assert (b.id, b.image_id, b.xywh, b.score) == (0, 785, BBOX, BOX_SCORE)
    assert image.shape == (425, 640, 3) and image.dtype == np.uint8
    # RGB, not BGR: these are the four neighbours the hand-worked crop pixel below reads.
    assert [tuple(image[y, x]) for y, x in ((IY, IX), (IY, IX + 1), (IY + 1, IX), (IY + 1, IX + 1))] \
        == [P00, P01, P10, P11]


# ------------------------------------------------------------------ 2. tasks/transforms.py


def test_center_scale_and_crop_box(prepared):
    from tasks.transforms import box_xywh_to_center_scale, center_scale_to_crop_box

    c, s = box_xywh_to_center_scale(BBOX)
    assert c.dtype == s.dtype == np.float32
    assert tuple(c.tolist()) == CENTER and tuple(s.tolist()) == SCALE
    assert tuple(center_scale_to_crop_box(c, s).tolist()) == CROP_BOX
    assert tuple(prepared.crop_boxes[0].tolist()) == CROP_BOX  # what the worker keeps for decoding


def test_affine_maps_the_crop_box_corners_to_the_crop_corners():
    from tasks.transforms import affine_matrix

    m = affine_matrix(np.array(CENTER, f32), SCALE[0], (192, 256))
    # Solved from float32 points: within 4e-16 of k on the diagonal, the translation within 1e-13.
    np.testing.assert_allclose(np.diag(m[:, :2]), [K, K], rtol=1e-15)
    np.testing.assert_allclose(m[:, 2], [TX, TY], rtol=0, atol=1e-13)
    x1, y1, x2, y2 = CROP_BOX
    # Closed form: (x1 - c_x) k + 96 = -156.35637 * 0.61398 + 96 = 0; (y1 - c_y) k + 128 = -208.47517 * 0.61398 + 128 = 0
    #              (x2 - c_x) k + 96 = 156.35638 * 0.61398 + 96 = 192; (y2 - c_y) k + 128 = 208.47516 * 0.61398 + 128 = 256
    corners = {(x1, y1): (0, 0), (x2, y1): (192, 0), (x1, y2): (0, 256), (x2, y2): (192, 256), CENTER: (96, 128)}
    for src, dst in corners.items():
        np.testing.assert_allclose(m @ [src[0], src[1], 1.0], dst, rtol=0, atol=2e-5)  # the corners' float32 rounding


def test_crop_pixel_by_opencv_s_fixed_point_rule(prepared):
    assert W00 + W01 + W10 + W11 == 32768
    for ch in range(3):
        acc = W00 * P00[ch] + W01 * P01[ch] + W10 * P10[ch] + W11 * P11[ch]
        assert (acc + 16384) >> 15 == CROP_VALUE[ch]
    crop = prepared.crops[0]
    assert crop.shape == (256, 192, 3) and crop.dtype == np.uint8
    assert tuple(crop[V, U]) == CROP_VALUE


# ------------------------------------------------------------------ 3. the graph's normalisation (tasks/deploy.py)


def test_uint8_crops_go_to_the_backend_as_cut_and_the_graph_normalises_them(prepared):
    import torch

    from tasks.deploy import deployed_module
    from tasks.pipeline import network_inputs
    from tasks.transforms import crops_to_input

    inputs = network_inputs(prepared.crops, UINT8, flip=True)
    assert [(x.dtype, x.shape) for x in inputs] == [(np.uint8, (1, 256, 192, 3))] * 2
    np.testing.assert_array_equal(inputs[0], prepared.crops)
    assert tuple(inputs[1][0, V, 191 - U]) == CROP_VALUE  # the mirror: column u goes to 191 - u

    # The exported graph's own normalisation, around a network that returns its input.
    graph = deployed_module(torch.nn.Identity(), UINT8)
    with torch.no_grad():
        x, x_mirror = (graph(torch.from_numpy(a)).numpy() for a in inputs)
    assert x.shape == (1, 3, 256, 192) and x.dtype == np.float32
    assert x[0, :, V, U].tolist() == list(INPUT_VALUE)
    assert x_mirror[0, :, V, 191 - U].tolist() == list(INPUT_VALUE)
    assert float(x[0, 0, V, U]) != INPUT_R_ONE_ROUNDING
    # The float-input variant branches here: the host normalises, to the same bits.
    assert crops_to_input(prepared.crops)[0, :, V, U].tolist() == list(INPUT_VALUE)


# ------------------------------------------------------------------ 4. tasks/decode.py


def heatmap_pair() -> tuple[np.ndarray, np.ndarray]:
    """The plain pass ``H`` and the mirrored pass ``Hf``, made so that their flip merge is known.

    The merge takes ``Hf`` mirrored, its left/right joints swapped, shifted one column right:
    merged[j, y, x] = (H[j, y, x] + Hf[pair(j), y, 48 - x]) / 2 for x >= 1. Everything else is
    -0.0625 in both, so it merges to -0.0625: not > 0, masked.
    """
    h = np.full((1, 17, 64, 48), -0.0625, f32)
    hf = h.copy()
    # Joint 0 (nose, its own pair): merged (30, 21) = (0.75 + 1.0)/2 = 0.875, (31, 21) = (0.5 + 0.5)/2 = 0.5,
    # (29, 21) = (0.25 + 0.25)/2 = 0.25, (30, 22) = 0.125, (30, 20) = 0.375. Hf's columns: 48 - 30 = 18, 17, 19.
    for (y, x), plain, mirrored in (((21, 30), 0.75, 1.0), ((21, 31), 0.5, 0.5), ((21, 29), 0.25, 0.25),
                                    ((22, 30), 0.125, 0.125), ((20, 30), 0.375, 0.375)):
        h[0, 0, y, x], hf[0, 0, y, 48 - x] = plain, mirrored
    # Joint 5 (left shoulder) at (10, 40): the mirrored pass sees it as joint 6 (right shoulder) at column 48 - 10 = 38.
    # Without the swap the merge would be (0.5 - 0.0625)/2 = 0.21875 there, not 0.5.
    h[0, 5, 40, 10], hf[0, 6, 40, 38] = 0.5, 0.5
    # Joint 1 (left eye) 0.25 at (10, 10) and joint 2 (right eye) 0.1875 at (30, 10), each through the other.
    h[0, 1, 10, 10], hf[0, 2, 10, 38] = 0.25, 0.25
    h[0, 2, 10, 30], hf[0, 1, 10, 18] = 0.1875, 0.1875
    return h, hf


def decoded(prepared) -> np.ndarray:
    from tasks.decode import decode_keypoints
    from tasks.pipeline import merge_outputs, network_inputs

    inputs = network_inputs(prepared.crops, UINT8, flip=True)
    merged = merge_outputs(UINT8, inputs, list(heatmap_pair()), 0.0)
    assert (merged.calls, merged.crops) == (2, 2)
    hm = merged.heatmaps
    assert hm[0, 0, 21, 29:32].tolist() == [0.25, 0.875, 0.5] and hm[0, 0, 20:23, 30].tolist() == [0.375, 0.875, 0.125]
    assert (hm[0, 5, 40, 10], hm[0, 1, 10, 10], hm[0, 2, 10, 30]) == (0.5, 0.25, 0.1875)
    return decode_keypoints(hm, prepared.crop_boxes)


def test_heatmap_peak_to_image_pixels(prepared):
    k = decoded(prepared)
    assert k.shape == (1, 17, 3) and k.dtype == np.float32
    # Upstream's own decode of heatmap point (30.25, 20.75) in this crop box gives these float32 values.
    assert k[0, 0].tolist() == [*NOSE, 0.875]
    np.testing.assert_allclose(k[0, 5, :2], SHOULDER, rtol=0, atol=DECODE_TOL)
    assert k[0, 5, 2] == 0.5
    # Masked joints (maximum -0.0625, not > 0) keep their score and go to heatmap (0, 0).
    for j in (3, 4, 6, 16):
        np.testing.assert_allclose(k[0, j, :2], MASKED, rtol=0, atol=DECODE_TOL)
        assert k[0, j, 2] == -0.0625


# ------------------------------------------------------------------ 5. tasks/evaluation.py


def test_record_area_and_rescored_score(box, prepared):
    from reference_evaluation import rescore, result_record
    from tasks.evaluation import nms_rows, pose_columns

    b, _ = box
    k = decoded(prepared)
    columns = pose_columns([b], np.array([0]), k, prepared.crop_boxes)
    assert columns.areas.tolist() == [AREA]
    assert columns.bboxes.tolist() == [[float(f32(v)) for v in BBOX]]  # the detection's box, not the crop box
    assert columns.scores.tolist() == [BOX_SCORE]
    rows, scores = nms_rows(columns.image_ids, columns.scores, columns.keypoints, columns.areas)
    assert rows.tolist() == [0] and scores.tolist() == [RESCORED]  # one result: OKS-NMS keeps it
    # The per-record rule gives the same number.
    assert rescore(result_record(785, BBOX, BOX_SCORE, k[0], AREA)) == RESCORED
