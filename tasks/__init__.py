"""The pipeline's stages as plain code (no Ray, no argparse, no YAML).

Vocabulary:
    box       a person box from a detection file or the GT: ``Box(id, image_id, xywh, score)``
    crop      the 256x192 uint8 RGB warp of the box's widened region (``transforms``)
    input     the normalised float32 ``[N, 3, 256, 192]`` network input
    heatmaps  the raw float32 ``[N, 17, 64, 48]`` network output (``backends``)
    keypoints float32 ``[N, 17, 3]``: x, y in image pixels and the heatmap maximum (``decode``)
    record    one COCO keypoint result dict (``evaluation``)

Stages, in the order a crop meets them: dataset -> transforms -> backends -> decode -> evaluation.
With ``uint8_input`` (the default on CPU devices) the uint8 crop goes to the backend as cut
and the normalisation runs inside the exported graph (``deploy``), not in ``transforms``.
What each stage computes, to the bit, and why: docs/numerics.md.
"""
