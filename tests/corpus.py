"""Generated bad, odd and edge-case uploads, each with the outcome the service promises (README: Limits)."""

import io
import struct
import zipfile
import zlib

import cv2
import numpy as np
from PIL import Image

RNG = np.random.default_rng(7)
PHOTO = RNG.integers(0, 255, (60, 80, 3), np.uint8)


def _pil(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's calling card)."""
    return _png_chunks(width, height, 2, zlib.compress(b"\0" * 64))


def _bomb_png(width: int, height: int, channels: int = 3) -> bytes:
    """A real, valid black PNG of ``width`` x ``height``: a few hundred KB on the wire, gigabytes once decoded.

    Built without compressing the whole image: a run of zero rows is compressed once, ending in a full flush (which
    makes the next run's bytes independent of the first), and repeated; the checksum of N zero bytes is known."""
    row = width * channels + 1  # filter byte + pixels
    rows = next(n for n in range(64, 0, -1) if height % n == 0)
    z = zlib.compressobj(9)
    first = z.compress(b"\0" * row * rows) + z.flush(zlib.Z_FULL_FLUSH)
    again = z.compress(b"\0" * row * rows) + z.flush(zlib.Z_FULL_FLUSH)
    end = z.flush()[:-4]  # the final empty block, without the checksum
    total = row * height
    idat = first + again * (height // rows - 1) + end + struct.pack(">I", ((total % 65521) << 16) | 1)
    return _png_chunks(width, height, 2 if channels == 3 else 0, idat)


def _png_chunks(width: int, height: int, colour_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _ico_holding(png: bytes) -> bytes:
    """An ICO file whose one entry is ``png`` (its directory says 256x256, whatever the PNG holds)."""
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def _icns_holding(png: bytes) -> bytes:
    """An ICNS file whose one icon (type ic10) is ``png``."""
    entry = b"ic10" + struct.pack(">I", len(png) + 8) + png
    return b"icns" + struct.pack(">I", len(entry) + 8) + entry


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    return _pil(Image.fromarray(PHOTO), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.fromarray(RNG.integers(0, 255, (30, 40, 3), np.uint8)) for _ in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("photo.jpg", b"not really")
    return buf.getvalue()


IMG = Image.fromarray(PHOTO)
JPEG = _pil(IMG, "JPEG", quality=90)
PNG = _pil(IMG, "PNG")
# Issue 23's container bombs: 1.7 GB and 768 MB of RGB pixels once decoded, each under 2 MB on the wire.
ICO_BOMB = _ico_holding(_bomb_png(24000, 24000))
ICNS_BOMB = _icns_holding(_bomb_png(16000, 16000))

# (name, filename, content type, bytes, expected status, expected (height, width) of the mask or None)
CASES = [
    ("jpeg", "a.jpg", "image/jpeg", JPEG, 200, (60, 80)),
    ("png", "a.png", "image/png", PNG, 200, (60, 80)),
    ("bmp", "a.bmp", "image/bmp", _pil(IMG, "BMP"), 200, (60, 80)),
    ("webp", "a.webp", "image/webp", _pil(IMG, "WEBP"), 200, (60, 80)),
    ("tiff", "a.tiff", "image/tiff", _pil(IMG, "TIFF"), 200, (60, 80)),
    ("static gif", "a.gif", "image/gif", _pil(IMG.convert("P"), "GIF"), 200, (60, 80)),
    ("animated gif: first frame", "a.gif", "image/gif", _animated_gif(), 200, (30, 40)),
    ("grayscale png", "g.png", "image/png", _pil(IMG.convert("L"), "PNG"), 200, (60, 80)),
    ("grayscale jpeg", "g.jpg", "image/jpeg", _pil(IMG.convert("L"), "JPEG"), 200, (60, 80)),
    ("rgba png", "a.png", "image/png", _pil(IMG.convert("RGBA"), "PNG"), 200, (60, 80)),
    ("la png", "a.png", "image/png", _pil(IMG.convert("LA"), "PNG"), 200, (60, 80)),
    ("palette png", "p.png", "image/png", _pil(IMG.convert("P"), "PNG"), 200, (60, 80)),
    ("16-bit png", "d.png", "image/png", cv2.imencode(".png", PHOTO.astype(np.uint16) * 257)[1].tobytes(), 200, (60, 80)),
    ("16-bit grey png", "d.png", "image/png", cv2.imencode(".png", PHOTO[..., 0].astype(np.uint16) * 257)[1].tobytes(), 200, (60, 80)),
    ("cmyk jpeg", "c.jpg", "image/jpeg", _pil(IMG.convert("CMYK"), "JPEG"), 200, (60, 80)),
    ("progressive jpeg", "p.jpg", "image/jpeg", _pil(IMG, "JPEG", progressive=True), 200, (60, 80)),
    ("exif-rotated jpeg: rotated", "r.jpg", "image/jpeg", _exif_rotated(), 200, (80, 60)),
    ("1x1 png", "one.png", "image/png", _pil(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), 200, (1, 1)),
    ("1x10000 png", "tall.png", "image/png", _pil(Image.new("RGB", (1, 10000), (10, 200, 10)), "PNG"), 200, (10000, 1)),
    ("10000x1 png", "wide.png", "image/png", _pil(Image.new("RGB", (10000, 1), (10, 10, 200)), "PNG"), 200, (1, 10000)),
    ("right image, wrong content type", "a.txt", "text/plain", PNG, 200, (60, 80)),
    ("right image, no extension", "upload", "application/octet-stream", JPEG, 200, (60, 80)),
    ("zero bytes", "a.png", "image/png", b"", 400, None),
    ("truncated jpeg", "t.jpg", "image/jpeg", JPEG[: len(JPEG) // 2], 400, None),
    ("jpeg cut in the header", "t.jpg", "image/jpeg", JPEG[:150], 400, None),
    ("truncated png", "t.png", "image/png", PNG[: len(PNG) // 2], 400, None),
    ("png with a broken IDAT", "b.png", "image/png", PNG[:60] + b"\0" * 200 + PNG[260:], 400, None),
    ("png declaring 100000x100000", "huge.png", "image/png", _png_declaring(100_000, 100_000), 413, None),
    ("valid 12000x12000 png bomb", "bomb.png", "image/png", _bomb_png(12000, 12000, channels=1), 413, None),
    ("ico holding a 24000x24000 png", "bomb.ico", "image/x-icon", ICO_BOMB, 415, None),
    ("icns holding a 16000x16000 png", "bomb.icns", "image/icns", ICNS_BOMB, 415, None),
    ("ico holding a png that declares 100000x100000", "d.ico", "image/x-icon",
     _ico_holding(_png_declaring(100_000, 100_000)), 415, None),
    ("ppm (OpenCV reads it; not on the allow-list)", "a.ppm", "image/x-portable-pixmap", _pil(IMG, "PPM"), 415, None),
    ("tga", "a.tga", "image/x-tga", _pil(IMG, "TGA"), 415, None),
    ("pcx", "a.pcx", "image/x-pcx", _pil(IMG, "PCX"), 415, None),
    ("psd-like header", "a.psd", "image/vnd.adobe.photoshop", b"8BPS\x00\x01" + b"\0" * 200, 415, None),
    ("svg", "a.svg", "image/svg+xml",
     b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>', 415, None),
    ("zip", "a.zip", "application/zip", _zip(), 415, None),
    ("text named .jpg", "notes.jpg", "image/jpeg", b"hello, this is not a picture\n" * 10, 415, None),
    ("html", "a.png", "image/png", b"<!doctype html><html><body>hi</body></html>", 415, None),
    ("pdf", "a.pdf", "application/pdf", _pil(IMG, "PDF"), 415, None),
    ("random bytes", "r.bin", "application/octet-stream", RNG.integers(0, 255, 4096, np.uint8).tobytes(), 415, None),
    ("ico (decodable elsewhere, not by OpenCV)", "a.ico", "image/x-icon", _pil(IMG, "ICO"), 415, None),
    ("float tiff", "f.tiff", "image/tiff", _pil(Image.fromarray(PHOTO[..., 0].astype(np.float32)), "TIFF"), 415, None),
    ("only a png signature", "s.png", "image/png", b"\x89PNG\r\n\x1a\n", 400, None),
]
