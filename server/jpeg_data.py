"""A JPEG checked before it is decoded: a bounded number of scans, and no image data that the decoder would invent.

libjpeg (inside Pillow) treats damaged or missing image data as a *warning*, not an error: it fills the blocks it
could not read (grey, or a progressive image's missing refinements) and reports success, and Pillow does not pass
the warning on. A JPEG cut short with an end-of-image marker after the cut (an interrupted upload or write, a camera
frame cut mid-stream) was therefore certified as an image whose lower rows the decoder made up. Refused here, as the
PNG path refuses rows missing from its data (:mod:`server.imaging`):

* **Structure** (a walk along the marker segments; the entropy-coded data is skipped by a regular expression, at C
  speed): at most ``JPEG_MAX_SCANS`` scans (each scan is a pass over the whole image: a few MB of tiny scans held a
  decode thread for minutes), and every component's every coefficient coded to full precision by some scan (a
  progressive JPEG cut exactly between two scans is a well-formed stream with fewer scans, on which libjpeg warns
  nothing; a sequential one cut before a component's own scan likewise).
* **Data**: one strict decode by libjpeg-turbo through ``simplejpeg`` (every libjpeg warning raised as an error):
  a scan that ends early, a bad Huffman or arithmetic code, a lost restart marker, an inconsistent progression or
  an unknown colour transform refuses the image with libjpeg's own message. Only "extraneous bytes before marker
  0xd9" is let through: bytes after the last scan, before the end marker, with every scan already decoded. Costs
  about one more decode of the image (measured: 0.6-1.3x Pillow's own on 2048x2048 RGB JPEGs; 15 us for a 28x28
  grey one); the pixels certified are still Pillow's.

Not detectable by any decoder: damage that still parses (a flipped bit inside a Huffman code that yields another
valid code). The certificate's ``input.sha256`` names the bytes that were certified.
"""

from __future__ import annotations

import re

import numpy as np
import simplejpeg

JPEG_MAX_SCANS = 500  # as TurboJPEG's TJFLAG_LIMITSCANS; an encoder's progressive JPEG has about 10

_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length: TEM, SOI, RST0-7
_MARKER_IN_DATA = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")  # in entropy-coded data: the next marker (not a stuffed
# 0xFF 0x00, a restart marker or a fill byte)
_ANY_MARKER = re.compile(rb"\xff[^\x00\xff]")  # between segments: libjpeg's next_marker skips other bytes
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # start of frame (DHT, JPG and DAC share the range)
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_TRAILING_BYTES = re.compile(r"extraneous bytes before marker 0xd9$")
_COLORSPACE = {"Gray": "GRAY", "CMYK": "CMYK", "YCCK": "CMYK"}  # others (YCbCr, RGB) decode to RGB


def jpeg_problem(raw: bytes) -> str | None:
    """Why the JPEG ``raw`` must be refused (a message for the caller), or None: too many scans, a coefficient that
    no scan codes to full precision, or a libjpeg warning on its data (module docstring). Bytes between segments,
    which libjpeg skips with a warning and reads on, are dropped before the strict decode, as libjpeg drops them."""
    frame, scans, stream = _segments(raw)
    if scans is None:
        return (f"the JPEG has more than {JPEG_MAX_SCANS} scans (each one a pass over the whole image; a progressive "
                "JPEG from an encoder has about 10): re-encode it, e.g. as baseline JPEG or PNG")
    missing = _uncoded(frame, scans)
    if missing:
        return f"the image data is truncated or corrupt: {missing}; send the whole file"
    try:
        header = simplejpeg.decode_jpeg_header(stream)
        simplejpeg.decode_jpeg(stream, colorspace=_COLORSPACE.get(header[2], "RGB"), strict=True)
    except MemoryError:
        raise
    except Exception as exc:  # simplejpeg raises ValueError with libjpeg's message, for warnings and errors alike
        message = str(exc).strip()
        if not _TRAILING_BYTES.search(message):
            return f"the image data is truncated or corrupt: libjpeg reports '{message}'; send the whole, intact file"
    return None


Frame = tuple[int, list[int]]  # (start-of-frame marker, component ids)
Scan = tuple[list[int], int, int, int]  # (component ids, Ss, Se, Al)


def _segments(raw: bytes) -> tuple[Frame | None, list[Scan] | None, bytes]:
    """((frame marker, component ids) of the first frame header or None, [(component ids, Ss, Se, Al) of each scan],
    the stream without the bytes between segments), read along the marker segments; scans None when there are more
    than JPEG_MAX_SCANS. Bytes between segments are skipped to the next marker, as libjpeg does (so the scan count
    resyncs there, as the decoder's would); any other malformed structure is left to the decoder."""
    pos, frame, scans, count, junk = 2, None, [], 0, []
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:  # bytes between segments: libjpeg skips them with a warning and reads on
            found = _ANY_MARKER.search(raw, pos)
            if found is None:
                break
            junk.append((pos, found.start()))
            pos = found.start()
            continue
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:  # EOI
            break
        elif marker in _STANDALONE:
            pos += 2
        else:
            end = pos + 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
            body, pos = raw[pos + 4:end], end
            if marker in _SOF and frame is None and len(body) >= 6:
                frame = (marker, list(body[6:6 + 3 * body[5]:3]))
            elif marker == 0xDA:
                count += 1
                if count > JPEG_MAX_SCANS:
                    return frame, None, raw
                if len(body) >= 1 + 2 * body[0] + 3:
                    n = body[0]
                    scans.append((list(body[1:1 + 2 * n:2]), body[1 + 2 * n], body[2 + 2 * n], body[3 + 2 * n] & 0x0F))
                found = _MARKER_IN_DATA.search(raw, pos)
                if found is None:
                    break
                pos = found.start()
    return frame, scans, _without(raw, junk)


def _without(raw: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """``raw`` without the byte ranges (start, end), which are in order and disjoint."""
    if not ranges:
        return raw
    starts = [0] + [end for _, end in ranges]
    ends = [start for start, _ in ranges] + [len(raw)]
    return b"".join(raw[a:b] for a, b in zip(starts, ends))


def _uncoded(frame: Frame | None, scans: list[Scan]) -> str | None:
    """What the scans leave uncoded (a sentence), or None. Sequential frames: each component needs a scan.
    Progressive: each (component, coefficient 0..63) needs a scan covering it with successive approximation Al = 0,
    the last bit. A stream whose frame header could not be read is left to the decoder."""
    if frame is None:
        return None
    marker, components = frame
    if marker not in _PROGRESSIVE:
        absent = [c for c in components if not any(c in ids for ids, *_ in scans)]
        return f"no scan of the JPEG codes its component {absent[0]} of {len(components)}" if absent else None
    done = {c: np.zeros(64, dtype=bool) for c in components}
    for ids, start, end, low_bit in scans:
        if low_bit == 0:
            for c in ids:
                if c in done:
                    done[c][start:min(end, 63) + 1] = True
    for c, coded in done.items():
        if not coded.all():
            k = int(np.flatnonzero(~coded)[0])
            return (f"the JPEG's coefficient {k} of component {c} is never coded to full precision (its progressive "
                    "scans end early)")
    return None
