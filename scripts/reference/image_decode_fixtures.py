#!/usr/bin/env python3
"""Reference fixtures for the image decoder (`crates/videollava/src/media/image.rs`).

Makes small images in every format and mode the decoder supports, and for each writes
`<file>.rgb.safetensors` holding `rgb` (U8 [H, W, 3]) = np.asarray(Image.open(f).convert("RGB")),
the pixels transformers' image processor receives. Files Pillow cannot write (2/4-bit grey PNGs,
16-bit RGB PNGs, GIFs whose first frame is smaller than the screen, ...) are written by hand.

Also writes `shared_media.expected.json`: sha256 of the Pillow RGB bytes of the shared photos.

Usage:
    /work/venv-ref/bin/python scripts/reference/image_decode_fixtures.py \
        --out crates/videollava/tests/fixtures/images
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from safetensors.numpy import save_file

W, H = 37, 23


def detailed_rgb(seed: int, w: int = W, h: int = H) -> np.ndarray:
    """Gradients plus noise plus a few hard edges: errors in upsampling/IDCT/colour show up."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1)).astype(np.int32)
    g = (y * 255 // max(h - 1, 1)).astype(np.int32)
    b = ((x + y) * 7 % 256).astype(np.int32)
    img = np.stack([r, g, b], axis=-1) + rng.integers(-40, 41, size=(h, w, 3))
    img[h // 3 : h // 2, w // 4 : w // 2] = [250, 10, 30]  # saturated red block: chroma edges
    img[:, w - 5] = [0, 0, 0]
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- hand-written PNG


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: Path, w: int, h: int, bit_depth: int, color_type: int, rows: list[bytes] | None,
              plte: bytes | None = None, trns: bytes | None = None, adam7: bytes | None = None) -> None:
    """rows: the image rows, filter type 0; or adam7: the whole interlaced stream (see adam7_stream)."""
    raw = adam7 if adam7 is not None else b"".join(b"\x00" + r for r in rows)
    out = b"\x89PNG\r\n\x1a\n"
    interlace = 1 if adam7 is not None else 0
    out += png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, interlace))
    if plte is not None:
        out += png_chunk(b"PLTE", plte)
    if trns is not None:
        out += png_chunk(b"tRNS", trns)
    out += png_chunk(b"IDAT", zlib.compress(raw, 9))
    out += png_chunk(b"IEND", b"")
    path.write_bytes(out)


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Packs one row of small integers MSB-first, as PNG does for 1/2/4-bit samples."""
    per = 8 // bits
    out = bytearray()
    for i in range(0, len(values), per):
        byte = 0
        chunk = values[i : i + per]
        for j in range(per):
            v = int(chunk[j]) if j < len(chunk) else 0
            byte |= v << (8 - bits * (j + 1))
        out.append(byte)
    return bytes(out)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def adam7_stream(pixels: np.ndarray, pack_row) -> bytes:
    """Adam7 passes of pixels (H x W [x C]), each row packed by pack_row and given filter type 0."""
    out = b""
    for x0, y0, dx, dy in ADAM7:
        sub = pixels[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        out += b"".join(b"\x00" + pack_row(r) for r in sub)
    return out


# ---------------------------------------------------------------- hand-written BMP


def write_bmp(path: Path, w: int, h: int, bpp: int, pixel_data: bytes, compression: int = 0,
              masks: bytes = b"", palette: bytes = b"", colors: int = 0, top_down: bool = False) -> None:
    offset = 14 + 40 + len(masks) + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, w, -h if top_down else h, 1, bpp, compression, len(pixel_data),
                       2835, 2835, colors, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixel_data), 0, 0, offset)
    path.write_bytes(header + info + masks + palette + pixel_data)


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


# ---------------------------------------------------------------- hand-written GIF


def lzw_literal(indices: np.ndarray, min_code_size: int) -> bytes:
    """GIF LZW stream made of literals only (valid, no compression): a clear code often enough
    that the code width never grows."""
    clear, eoi = 1 << min_code_size, (1 << min_code_size) + 1
    width = min_code_size + 1
    limit = (1 << width) - (1 << min_code_size) - 3  # literals before the table would widen codes
    bits, nbits, out = 0, 0, bytearray()

    def emit(code: int) -> None:
        nonlocal bits, nbits
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8

    emit(clear)
    for n, v in enumerate(indices.ravel()):
        if n and n % limit == 0:
            emit(clear)
        emit(int(v))
    emit(eoi)
    if nbits:
        out.append(bits & 0xFF)
    blocks = bytearray([min_code_size])
    for i in range(0, len(out), 255):
        blocks.append(len(out[i : i + 255]))
        blocks += out[i : i + 255]
    blocks.append(0)
    return bytes(blocks)


def write_gif(path: Path, screen: tuple[int, int], global_palette: bytes | None,
              frames: list[dict]) -> None:
    """frames: dicts with x, y, indices (h x w array), transparency (int | None),
    local_palette (bytes | None), min_code_size."""
    sw, sh = screen
    out = bytearray(b"GIF89a")
    flags = 0
    if global_palette is not None:
        n = len(global_palette) // 3
        size_bits = max(n - 1, 1).bit_length() - 1
        flags = 0x80 | (7 << 4) | size_bits
    out += struct.pack("<HHBBB", sw, sh, flags, 0, 0)
    if global_palette is not None:
        out += global_palette
    for f in frames:
        tr = f.get("transparency")
        gce_flags = (1 << 2) | (1 if tr is not None else 0)  # dispose: do not dispose
        out += b"!\xf9\x04" + struct.pack("<BHB", gce_flags, 10, tr or 0) + b"\x00"
        idx = f["indices"]
        fh, fw = idx.shape
        lflags = 0
        lp = f.get("local_palette")
        if lp is not None:
            n = len(lp) // 3
            lflags = 0x80 | (max(n - 1, 1).bit_length() - 1)
        out += b"," + struct.pack("<HHHHB", f["x"], f["y"], fw, fh, lflags)
        if lp is not None:
            out += lp
        out += lzw_literal(idx, f.get("min_code_size", 8))
    out += b";"
    path.write_bytes(bytes(out))


# ---------------------------------------------------------------- fixtures


def make_all(out: Path) -> list[Path]:
    rgb = detailed_rgb(1)
    im_rgb = Image.fromarray(rgb, "RGB")
    rng = np.random.default_rng(7)
    alpha = rng.integers(0, 256, size=(H, W), dtype=np.uint8)
    im_rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    im_l = im_rgb.convert("L")
    files: list[Path] = []

    def save(name: str, im: Image.Image, **kw) -> None:
        p = out / name
        im.save(p, **kw)
        files.append(p)

    # JPEG (Pillow writes through libjpeg-turbo; decode must match ISLOW + fancy upsampling)
    save("jpeg_420.jpg", im_rgb, quality=85, subsampling=2)
    save("jpeg_422.jpg", im_rgb, quality=90, subsampling=1)
    save("jpeg_444.jpg", im_rgb, quality=95, subsampling=0)
    save("jpeg_grey.jpg", im_l, quality=90)
    save("jpeg_progressive.jpg", im_rgb, quality=80, progressive=True)
    save("jpeg_cmyk.jpg", im_rgb.convert("CMYK"), quality=90)  # Adobe marker, inverted CMYK
    cmyk = np.dstack([rgb, (255 - rgb.max(axis=2)) // 2]).astype(np.uint8)  # real black channel
    save("jpeg_cmyk_black.jpg", Image.frombytes("CMYK", (W, H), cmyk.tobytes()), quality=90)
    # Odd, 4:2:0, with EXIF orientation 6: Pillow ignores the tag on open, so must we.
    exif = Image.Exif()
    exif[0x0112] = 6
    save("jpeg_exif_rotated.jpg", Image.fromarray(detailed_rgb(2, 19, 13)), quality=75, exif=exif)

    # PNG written by Pillow
    save("png_rgb.png", im_rgb)
    save("png_rgba.png", im_rgba)
    save("png_la.png", Image.fromarray(np.dstack([np.asarray(im_l), alpha]), "LA"))
    save("png_l.png", im_l)
    save("png_1bit.png", im_l.convert("1"))
    pal = im_rgb.quantize(colors=200, dither=Image.Dither.NONE)
    save("png_palette.png", pal)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    save("png_palette_trns.png", pal_t, transparency=3)
    pal16 = im_rgb.quantize(colors=16, dither=Image.Dither.FLOYDSTEINBERG)
    save("png_palette_4bit.png", pal16, bits=4)
    i16 = (np.arange(W * H, dtype=np.uint32).reshape(H, W) * 977 % 65536).astype(np.uint16)
    i16[0, :10] = [0, 1, 100, 254, 255, 256, 257, 1000, 65534, 65535]
    save("png_grey16.png", Image.fromarray(i16))

    # PNG written by hand: modes Pillow does not write
    def hand(name: str, *args, **kw) -> None:
        p = out / name
        write_png(p, *args, **kw)
        files.append(p)

    rgb16 = (rgb.astype(np.uint16) * 257 + rng.integers(0, 257, size=rgb.shape)).astype(">u2")
    hand("png_rgb16.png", W, H, 16, 2, [rgb16[y].tobytes() for y in range(H)])
    rgba16 = np.dstack([rgb16, (alpha.astype(np.uint16) * 257).astype(">u2")]).astype(">u2")
    hand("png_rgba16.png", W, H, 16, 6, [rgba16[y].tobytes() for y in range(H)])
    la16 = np.dstack([rgb16[..., 0], rgb16[..., 1]]).astype(">u2")
    hand("png_la16.png", W, H, 16, 4, [la16[y].tobytes() for y in range(H)])
    g2 = rng.integers(0, 4, size=(H, W))
    hand("png_grey2.png", W, H, 2, 0, [pack_bits(g2[y], 2) for y in range(H)])
    g4 = rng.integers(0, 16, size=(H, W))
    hand("png_grey4.png", W, H, 4, 0, [pack_bits(g4[y], 4) for y in range(H)])
    g8 = np.asarray(im_l)
    hand("png_grey_trns.png", W, H, 8, 0, [g8[y].tobytes() for y in range(H)], trns=struct.pack(">H", int(g8[5, 5])))
    hand("png_rgb_trns.png", W, H, 8, 2, [rgb[y].tobytes() for y in range(H)],
         trns=struct.pack(">HHH", *[int(v) for v in rgb[4, 4]]))
    # 2-bit palette with only 3 PLTE entries, and index 3 used: what does Pillow show for it?
    p2 = rng.integers(0, 4, size=(H, W))
    hand("png_palette2_short.png", W, H, 2, 3, [pack_bits(p2[y], 2) for y in range(H)],
         plte=bytes([200, 10, 10, 10, 200, 10, 10, 10, 200]), trns=bytes([0, 128]))
    # 8-bit palette, 10 entries, indices up to 255 (out of range)
    p8 = rng.integers(0, 256, size=(H, W)).astype(np.uint8)
    p8[:, : W // 2] %= 10
    plte10 = bytes(rng.integers(0, 256, size=30, dtype=np.uint8))
    hand("png_palette8_short.png", W, H, 8, 3, [p8[y].tobytes() for y in range(H)], plte=plte10)

    # Adam7-interlaced PNGs (Pillow reads but does not write them)
    hand("png_rgb_adam7.png", W, H, 8, 2, None, adam7=adam7_stream(rgb, lambda r: r.tobytes()))
    hand("png_grey4_adam7.png", W, H, 4, 0, None, adam7=adam7_stream(g4, lambda r: pack_bits(r, 4)))
    hand("png_rgba16_adam7.png", W, H, 16, 6, None, adam7=adam7_stream(rgba16, lambda r: r.tobytes()))

    # WebP
    save("webp_lossy.webp", im_rgb, quality=80)
    save("webp_lossless.webp", im_rgb, lossless=True)
    save("webp_lossy_alpha.webp", im_rgba, quality=80)
    save("webp_lossless_alpha.webp", im_rgba, lossless=True)
    # Animated WebP: Pillow gives the first frame (composited by libwebp's WebPAnimDecoder).
    second = rgb.copy()
    second[5:12, 6:20] = 0
    save("webp_animated.webp", im_rgb, save_all=True, append_images=[Image.fromarray(second)], duration=100,
         quality=80)
    save("webp_animated_alpha.webp", im_rgba, save_all=True, append_images=[im_rgb.convert("RGBA")],
         duration=100, lossless=True)

    # GIF written by Pillow (interlaced by default at this size)
    save("gif_static.gif", pal)
    frames = []
    for k in range(3):
        fr = Image.fromarray(detailed_rgb(10 + k)).quantize(colors=64, dither=Image.Dither.NONE)
        frames.append(fr)
    save("gif_anim_trns.gif", frames[0], save_all=True, append_images=frames[1:], transparency=5,
         duration=100, loop=0)

    # GIF written by hand: first frame smaller than the screen, at an offset.
    gpal = bytes(rng.integers(0, 256, size=3 * 256, dtype=np.uint8))
    small = rng.integers(0, 256, size=(12, 20)).astype(np.uint8)
    small[2:5, 3:9] = 17  # transparent pixels inside the frame
    p = out / "gif_offset_trns.gif"
    write_gif(p, (W, H), gpal, [dict(x=5, y=3, indices=small, transparency=17),
                                dict(x=0, y=0, indices=np.zeros((H, W), np.uint8), transparency=None)])
    files.append(p)
    p = out / "gif_offset_notrns.gif"
    write_gif(p, (W, H), gpal, [dict(x=9, y=6, indices=small, transparency=None)])
    files.append(p)
    # Frame reaching past the screen: Pillow grows the image.
    p = out / "gif_frame_past_screen.gif"
    write_gif(p, (20, 10), gpal, [dict(x=10, y=4, indices=small, transparency=None)])
    files.append(p)
    # Local palette of 4 colours, LZW with 8-bit codes: indices beyond the palette.
    lpal = bytes([255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0])
    idx = rng.integers(0, 256, size=(H, W)).astype(np.uint8)
    idx[:, : W // 2] %= 4
    p = out / "gif_local_short_palette.gif"
    write_gif(p, (W, H), gpal, [dict(x=0, y=0, indices=idx, transparency=2, local_palette=lpal)])
    files.append(p)
    # No palette at all: Pillow uses mode L (index = grey level).
    p = out / "gif_no_palette.gif"
    write_gif(p, (W, H), None, [dict(x=2, y=1, indices=small, transparency=None)])
    files.append(p)

    # BMP
    save("bmp_24.bmp", im_rgb)
    save("bmp_8_palette.bmp", pal)
    save("bmp_1bit.bmp", im_l.convert("1"))
    save("bmp_32_rgba.bmp", im_rgba)
    save("bmp_l.bmp", im_l)

    # BMP written by hand: 16-bit (Pillow widens 5/6-bit channels with truncation), 4-bit, RLE8,
    # top-down, a short palette with indices past its end.
    def hand_bmp(name: str, *args, **kw) -> None:
        p = out / name
        write_bmp(p, W, H, *args, **kw)
        files.append(p)

    v16 = rng.integers(0, 65536, size=(H, W)).astype("<u2")
    rows16 = b"".join(pad4(v16[y].tobytes()) for y in reversed(range(H)))
    hand_bmp("bmp_16_555.bmp", 16, rows16)
    hand_bmp("bmp_16_565.bmp", 16, rows16, compression=3, masks=struct.pack("<III", 0xF800, 0x07E0, 0x001F))
    hand_bmp("bmp_24_topdown.bmp", 24, b"".join(pad4(rgb[y, :, ::-1].tobytes()) for y in range(H)), top_down=True)
    pal16b = bytes(rng.integers(0, 256, size=64, dtype=np.uint8))
    hand_bmp("bmp_4bit.bmp", 4, b"".join(pad4(pack_bits(g4[y], 4)) for y in reversed(range(H))),
             palette=pal16b, colors=16)
    i8 = rng.integers(0, 256, size=(H, W)).astype(np.uint8)
    i8[:, : W // 2] %= 10
    hand_bmp("bmp_8_short_palette.bmp", 8, b"".join(pad4(i8[y].tobytes()) for y in reversed(range(H))),
             palette=bytes(rng.integers(0, 256, size=40, dtype=np.uint8)), colors=10)
    runs = (rng.integers(0, 4, size=(H, W)) * 3).astype(np.uint8)
    rle = bytearray()
    for y in reversed(range(H)):
        x = 0
        while x < W:
            n = 1
            while x + n < W and runs[y, x + n] == runs[y, x] and n < 255:
                n += 1
            rle += bytes([n, int(runs[y, x])])
            x += n
        rle += b"\0\0"
    rle += b"\0\1"
    hand_bmp("bmp_8_rle.bmp", 8, bytes(rle), compression=1,
             palette=bytes(rng.integers(0, 256, size=1024, dtype=np.uint8)), colors=256)
    return files


def rgb_of(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[3] / "shared",
                    help="shared/ folder holding fixtures/media (default: beside the repository)")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if old.is_file():
            old.unlink()

    files = make_all(out)
    manifest = []
    for f in files:
        arr = rgb_of(f)
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
        save_file({"rgb": np.ascontiguousarray(arr)}, str(f) + ".rgb.safetensors",
                  metadata={"source": f"{f.name}, Pillow {PIL.__version__}"})  # one key: stable bytes
        with Image.open(f) as im:
            manifest.append({"file": f.name, "pillow_mode": im.mode, "format": im.format,
                             "width": arr.shape[1], "height": arr.shape[0]})
    (out / "manifest.json").write_text(json.dumps({"pillow": PIL.__version__, "count": len(files),
                                                   "files": manifest}, indent=1) + "\n")

    media = args.shared / "fixtures" / "media"
    expected = {"pillow": PIL.__version__, "images": []}
    for name in ["chelsea.png", "coffee.png", "no_time_for_that_tiny.gif"]:
        arr = rgb_of(media / name)  # first frame for the GIF
        expected["images"].append({"file": f"fixtures/media/{name}", "width": arr.shape[1],
                                   "height": arr.shape[0],
                                   "sha256_rgb": hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()})
    (out / "shared_media.expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out.iterdir())
    print(f"{len(files)} fixtures in {out} ({total} bytes)")


if __name__ == "__main__":
    main()
