"""Turning a request body into model inputs, or a clear 4xx.

Accepted bodies (the content type decides; without one the first bytes do):

- an image, PNG or JPEG (``image/png``, ``image/jpeg``; or a ``multipart/form-data`` upload):
  decoded with Pillow, converted to the model's channels (L or RGB), resized to the model's input
  size when it differs, then normalised with the exported ``mean``/``std`` (``(x/255 - mean)/std``);
- a NumPy ``.npy`` array (``application/x-npy`` or ``application/octet-stream``; never unpickled):
  float arrays are model inputs (already normalised), uint8 arrays are raw pixels and are
  normalised as images are (pixels are refused, 422, when the export has no ``preprocess``);
- JSON (``application/json``): a nested list of numbers, or ``{"inputs": [...]}``: model inputs
  when any number has a decimal point or an exponent (``0.5``, ``1.0``, ``1e-3``); when every number
  is an integer and the export describes its images (``preprocess``), pixels 0-255 as a uint8
  array is (``img.tolist()`` of an image), refused (422) outside that range.

An array is one sample ``input_shape`` or a batch ``[B, *input_shape]`` with ``1 <= B <= max_batch``;
for one-channel images the channel axis may be left out (``[H, W]`` or ``[B, H, W]``).
"""
from __future__ import annotations

import functools
import io
import json
import math
from typing import Any

import numpy as np

__all__ = ["InputError", "decode_body", "MAX_BODY_BYTES", "MAX_BATCH"]

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_BATCH = 256
MAX_IMAGE_PIXELS = 4096 * 4096  # refuse decompression bombs before decoding


class InputError(ValueError):
    """A request that cannot be served: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _kind(body: bytes, content_type: str) -> str:
    ct = content_type.split(";")[0].strip().lower()
    if ct.startswith("multipart/form-data"):
        return "multipart"
    if ct in ("image/png", "image/jpeg", "image/jpg") or body[:8] == b"\x89PNG\r\n\x1a\n" or body[:3] == b"\xff\xd8\xff":
        return "image"
    if ct in ("application/x-npy", "application/npy", "application/octet-stream") or body[:6] == b"\x93NUMPY":
        return "npy"
    if ct == "application/json" or body.lstrip()[:1] in (b"[", b"{"):
        return "json"
    if ct.startswith("image/"):
        return "image"
    raise InputError(415, f"unsupported content type {ct or '(none)'!r}: send image/png, image/jpeg, "
                          "application/x-npy or application/json")


def _multipart_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """The first file part of a ``multipart/form-data`` body (the standard library's MIME parser)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise InputError(400, "malformed multipart/form-data body (no boundary or no parts)")
    for part in msg.iter_parts():
        data = part.get_payload(decode=True)
        if data:
            return data, part.get_content_type() if part.get("Content-Type") else ""
    raise InputError(400, "the multipart/form-data body holds no file")


def _image(body: bytes, manifest: dict) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c, h, w = _image_shape(manifest)
    try:
        with Image.open(io.BytesIO(body)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise InputError(413, f"image of {im.width}x{im.height} pixels is too large "
                                      f"(at most {MAX_IMAGE_PIXELS} pixels)")
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            px = np.asarray(im, dtype=np.uint8)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        why = "not a PNG or JPEG image Pillow can read" if isinstance(e, UnidentifiedImageError) else str(e)
        raise InputError(400, f"cannot decode the image: {why}") from None
    px = px[None] if px.ndim == 2 else px.transpose(2, 0, 1)
    return _normalise(px[None], manifest)


def _image_shape(manifest: dict) -> tuple[int, int, int]:
    shape = manifest["input_shape"]
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise InputError(415, f"this model takes inputs of shape {tuple(shape)}, not images; send an array")
    return tuple(shape)


def _normalise(px: np.ndarray, manifest: dict) -> np.ndarray:
    """uint8 pixels -> the model's float inputs (:func:`eenn.manifest.normalise_pixels`); a 422
    where the export has no statistics."""
    from ..manifest import normalise_pixels

    try:
        return normalise_pixels(px, manifest)
    except ValueError as e:
        raise InputError(422, str(e)) from None


_NPY_MAGIC = b"\x93NUMPY"


def _npy(body: bytes) -> np.ndarray:
    """A ``.npy`` body as an array (a read-only view of the body). Its header is read by NumPy's
    own parser, once per distinct header: requests of one shape repeat it, and parsing it is most
    of what ``np.load`` costs a small body (about 30 us). Arrays that need unpickling are refused."""
    view = memoryview(body)
    if bytes(view[:6]) != _NPY_MAGIC:
        raise InputError(400, "the body is not a .npy array (it does not begin with the .npy magic \\x93NUMPY): "
                              "send np.save's bytes, or another content type")
    start = None
    if len(view) >= 10:
        major = view[6]
        width = {1: 2, 2: 4}.get(major)  # (3.0, a UTF-8 header, is left to np.load)
        if width is not None and len(view) >= 8 + width:
            start = 8 + width + int.from_bytes(view[8:8 + width], "little")
    if start is None or start > len(view):
        return _npy_load(body)  # not a header we read ourselves: np.load says what is wrong
    try:
        shape, fortran, dtype = _npy_header(bytes(view[:start]))
    except Exception as e:  # noqa: BLE001 - whatever NumPy's parser refuses: the client's error
        raise InputError(400, f"cannot read the .npy body: {e}") from None
    if dtype.hasobject:
        raise InputError(422, "the .npy array cannot be read without unpickling (it holds Python objects); "
                              "send a numeric array")
    count = math.prod(shape)
    if len(view) - start != count * dtype.itemsize:
        raise InputError(400, f"cannot read the .npy body: its header announces {count * dtype.itemsize} bytes of "
                              f"{dtype} {shape} data, the body carries {len(view) - start}")
    try:
        return np.frombuffer(view, dtype=dtype, count=count, offset=start).reshape(shape, order="F" if fortran else "C")
    except ValueError as e:  # e.g. a dtype of no size
        raise InputError(400, f"cannot read the .npy body: {e}") from None


@functools.lru_cache(maxsize=64)
def _npy_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of a ``.npy`` header (magic and version included)."""
    fp = io.BytesIO(head)
    version = np.lib.format.read_magic(fp)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]} (1.0 and 2.0 are read)")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return tuple(int(d) for d in shape), bool(fortran), dtype


def _npy_load(body: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():  # object arrays need unpickling, which is refused
            raise InputError(422, f"the .npy array cannot be read without unpickling ({e}); send a numeric array") from None
        raise InputError(400, f"cannot read the .npy body: {e}") from None
    except Exception as e:
        raise InputError(400, f"cannot read the .npy body: {type(e).__name__}: {e}") from None


def _json(body: bytes, manifest: dict) -> np.ndarray:
    try:
        value: Any = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(400, f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(400, "the JSON body is nested too deeply to read: send an array of at most "
                              f"{1 + len(manifest['input_shape'])} levels (a batch of samples)") from None
    if isinstance(value, dict):
        if "inputs" not in value:
            raise InputError(422, 'a JSON object body needs an "inputs" field holding the array')
        value = value["inputs"]
    shape, depth, v = tuple(manifest["input_shape"]), 0, value
    while isinstance(v, list) and depth <= len(shape) + 1:  # no need to go deeper than a batch
        depth, v = depth + 1, (v[0] if v else None)
    if depth > len(shape) + 1:
        raise InputError(422, f"the JSON array is nested more than {len(shape) + 1} levels deep: expected one sample "
                              f"{shape} or a batch (B, {', '.join(map(str, shape))})")
    try:
        a = np.asarray(value)
    except ValueError as e:  # ragged nesting
        raise InputError(422, f"the JSON array is ragged (rows of different lengths): {e}") from None
    if a.dtype.kind not in "iuf":
        raise InputError(422, f"the JSON array must hold numbers only, got {a.dtype.kind!r} values "
                              "(strings, booleans, nulls or nested objects)")
    if a.dtype.kind in "iu" and manifest.get("preprocess"):  # integers for an image model: pixels
        if a.size and (a.min() < 0 or a.max() > 255):
            raise InputError(422, f"integer JSON values are read as pixels 0-255 for this image model, got values "
                                  f"from {a.min()} to {a.max()}: send pixels 0-255, or normalised model inputs "
                                  "written as floats (0.5, 1.0)")
        return a.astype(np.uint8)
    return a.astype(np.float64)


def _token_ids(a: np.ndarray, manifest: dict, max_batch: int) -> np.ndarray:
    """Integer model inputs (token ids) ``[B, *input_shape]`` in the export's ``input_dtype``."""
    shape, dtype = tuple(manifest["input_shape"]), np.dtype(manifest["input_dtype"])
    if a.dtype.kind not in "iu":
        if a.dtype.kind != "f" or not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise InputError(422, f"this model takes token ids: send whole numbers (an integer array), got {a.dtype} "
                                  "values that are not")
    if a.size and (a.min() < np.iinfo(dtype).min or a.max() > np.iinfo(dtype).max):
        raise InputError(422, f"token ids must fit {dtype}, got values from {a.min()} to {a.max()}")
    if a.shape == shape:
        a = a[None]
    if a.shape[1:] != shape or not 1 <= a.shape[0]:
        raise InputError(422, f"wrong shape {tuple(a.shape)}: expected one sample {shape} or a batch "
                              f"(B, {', '.join(map(str, shape))}) of token ids")
    if a.shape[0] > max_batch:
        raise InputError(413, f"batch of {a.shape[0]} samples is larger than the limit of {max_batch}")
    return a.astype(dtype)


def decode_body(body: bytes, content_type: str, manifest: dict, *, max_bytes: int = MAX_BODY_BYTES,
                max_batch: int = MAX_BATCH) -> np.ndarray:
    """The float32 model inputs ``[B, *input_shape]`` carried by a request body (for a model of
    token ids, integer arrays in the export's ``input_dtype``); raises
    :class:`InputError` with a 4xx status and the reason otherwise (400 for a body that none of
    the readers foresaw: the manifest is checked when it is read, so the body is what failed)."""
    try:
        return _decode(body, content_type, manifest, max_bytes, max_batch)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a body no check foresaw is still the client's, not a 500
        raise InputError(400, f"cannot read the body ({type(e).__name__}: {e})") from None


def _decode(body: bytes, content_type: str, manifest: dict, max_bytes: int, max_batch: int) -> np.ndarray:
    if len(body) > max_bytes:
        raise InputError(413, f"body of {len(body)} bytes is larger than the limit of {max_bytes} bytes")
    if not body:
        raise InputError(400, "empty body: send an image, a .npy array or a JSON array")
    kind = _kind(body, content_type)
    if kind == "multipart":
        body, content_type = _multipart_file(body, content_type)
        kind = _kind(body, content_type)
        if kind == "multipart":
            raise InputError(400, "nested multipart bodies are not accepted")
    ids = np.dtype(manifest.get("input_dtype", "float32")).kind in "iu"  # a model of token ids
    if kind == "image":
        if ids:
            raise InputError(415, "this model takes token ids, not images: send a .npy or JSON array of integers")
        return _image(body, manifest)
    a = _npy(body) if kind == "npy" else _json(body, manifest)
    if ids:
        return _token_ids(a, manifest, max_batch)
    if a.dtype == np.uint8:
        pixels = True
    elif a.dtype.kind == "f":
        pixels = False
    else:
        raise InputError(422, f"arrays of dtype {a.dtype} are not accepted: send float model inputs "
                              "(float16/32/64, normalised) or uint8 pixels")
    shape = tuple(manifest["input_shape"])
    grey = len(shape) == 3 and shape[0] == 1  # one-channel images may come without their channel axis
    if a.shape == shape or (grey and a.shape == shape[1:]):
        a = a.reshape(1, *shape)
    elif grey and a.ndim == 3 and a.shape[1:] == shape[1:]:
        a = a[:, None]
    if a.shape[1:] != shape or not 1 <= a.shape[0]:
        raise InputError(422, f"wrong shape {tuple(a.shape)}: expected one sample {shape} or a batch "
                              f"(B, {', '.join(map(str, shape))})"
                         + (f", or without the channel axis {shape[1:]} or (B, {shape[1]}, {shape[2]})" if grey else ""))
    if a.shape[0] > max_batch:
        raise InputError(413, f"batch of {a.shape[0]} samples is larger than the limit of {max_batch}")
    if pixels:
        return _normalise(a, manifest)
    with np.errstate(over="ignore"):
        x = a.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(422, f"the input holds {int(bad.sum())} non-finite values (NaN, infinity, or beyond "
                              "float32's range); send finite numbers")
    return x
