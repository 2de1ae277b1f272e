"""Darknet ``.cfg`` text -> a list of plain dataclass blocks (docs/numerics.md#detector-network).

Only the keys upstream AlphaPose reads are kept; the training keys (``jitter``,
``ignore_thresh``, the ``[net]`` optimiser settings ...) are parsed and dropped.
Layer ``i`` is the ``i``-th section after ``[net]``, counted from 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tasks.errors import UserError


class CfgError(UserError, ValueError):
    """The cfg cannot be turned into a network; the message is one line."""


@dataclass(frozen=True)
class Convolutional:
    filters: int
    size: int
    stride: int
    #: A flag, not a width: padding is ``(size - 1) // 2`` when set (trap D13).
    pad: bool
    #: BN layers have no conv bias; heads have a bias and no BN.
    batch_normalize: bool
    #: ``leaky`` (slope 0.1) or ``linear``.
    activation: str


@dataclass(frozen=True)
class Shortcut:
    #: Negative: relative to this layer; otherwise an absolute layer index.
    from_: int


@dataclass(frozen=True)
class Route:
    #: As written: negative entries are relative, non-negative ones absolute (trap D14).
    layers: tuple[int, ...]


@dataclass(frozen=True)
class MaxPool:
    size: int
    stride: int


@dataclass(frozen=True)
class Upsample:
    stride: int


@dataclass(frozen=True)
class Yolo:
    #: The anchors this head uses (``anchors[m] for m in mask``), in mask order, in
    #: input pixels.
    anchors: tuple[tuple[float, float], ...]
    classes: int


Block = Convolutional | Shortcut | Route | MaxPool | Upsample | Yolo


@dataclass(frozen=True)
class DarknetCfg:
    #: The ``[net]`` section as text; upstream overrides its size with INP_DIM.
    net: tuple[tuple[str, str], ...]
    layers: tuple[Block, ...]

    @property
    def yolo_heads(self) -> tuple[Yolo, ...]:
        """The detection heads in cfg order (strides 32, 16, 8 for YOLOv3)."""
        return tuple(b for b in self.layers if isinstance(b, Yolo))


def source_index(layer: int, ref: int) -> int:
    """A route/shortcut reference as an absolute layer index (Darknet's rule)."""
    return layer + ref if ref < 0 else ref


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _block(kind: str, keys: dict[str, str]) -> Block:
    if kind == "convolutional":
        return Convolutional(
            filters=int(keys["filters"]), size=int(keys["size"]), stride=int(keys.get("stride", "1")),
            pad=int(keys.get("pad", "0")) != 0,
            batch_normalize=int(keys.get("batch_normalize", "0")) != 0,
            activation=keys["activation"])
    if kind == "shortcut":
        return Shortcut(from_=int(keys["from"]))
    if kind == "route":
        return Route(layers=_ints(keys["layers"]))
    if kind == "maxpool":
        return MaxPool(size=int(keys["size"]), stride=int(keys.get("stride", "1")))
    if kind == "upsample":
        return Upsample(stride=int(keys.get("stride", "2")))
    if kind == "yolo":
        flat = [float(v) for v in keys["anchors"].split(",") if v.strip()]
        pairs = list(zip(flat[0::2], flat[1::2]))
        return Yolo(anchors=tuple(pairs[m] for m in _ints(keys["mask"])), classes=int(keys["classes"]))
    raise CfgError(f"unknown section [{kind}]")


def parse_darknet_cfg_text(text: str, source: str = "<cfg>") -> DarknetCfg:
    """Parse cfg text. ``source`` names the file in error messages."""
    sections: list[tuple[int, str, dict[str, str]]] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]"):
                raise CfgError(f"{source}:{lineno}: malformed section header {line!r}")
            sections.append((lineno, line[1:-1].strip(), {}))
        elif "=" in line and sections:
            key, value = line.split("=", 1)
            sections[-1][2][key.strip()] = value.strip()
        else:
            raise CfgError(f"{source}:{lineno}: expected '[section]' or 'key=value', got {line!r}")
    if not sections or sections[0][1] != "net":
        raise CfgError(f"{source}: the first section must be [net]")
    layers = []
    for lineno, kind, keys in sections[1:]:
        try:
            layers.append(_block(kind, keys))
        except CfgError as e:
            raise CfgError(f"{source}:{lineno}: {e}") from None
        except KeyError as e:
            raise CfgError(f"{source}:{lineno}: [{kind}] lacks the key {e.args[0]!r}") from None
        except (ValueError, IndexError) as e:
            raise CfgError(f"{source}:{lineno}: [{kind}]: {e}") from None
    return DarknetCfg(net=tuple(sections[0][2].items()), layers=tuple(layers))


def parse_darknet_cfg(path: str | Path) -> DarknetCfg:
    """Parse a Darknet ``.cfg`` file."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise CfgError(f"{path}: cannot read the cfg ({e.strerror})") from None
    return parse_darknet_cfg_text(text, str(path))
