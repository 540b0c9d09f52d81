"""A corpus of broken and awkward image files, generated (never stored in the repository), with what
``fd_ref.data.images.RobustImageFolder`` is documented to do with each: decode it (and to what), or skip it
with a warning and count it. ``bench/soak.py`` runs train.py and finetune.py on the corpus; the test
``tests/test_soak.py`` checks every file against its expectation in-process.

    files = make_corpus(root, n_good=24)       # root/a, root/b: good JPEGs + the files below; root/empty
    problems = check_decoding(root, files)     # [] when every file behaves as EXPECTED says

Kinds (``EXPECTED``): ``skip`` (warned once, counted in ``skipped_images``, the next readable image used
instead) or ``decode`` (an 8-bit RGB image; ``check`` below names what is checked of it).
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# name -> (file name, class folder, "decode" | "skip", what the decoded image must be / why it is skipped)
EXPECTED: dict[str, tuple[str, str, str, str]] = {
    "truncated_jpeg": ("truncated.jpg", "a", "skip", "the JPEG stream ends half-way (PIL: image file is truncated)"),
    "zero_bytes": ("zero.jpg", "b", "skip", "an empty file"),
    "text_as_jpg": ("notes.jpg", "a", "skip", "text, not an image (PIL: cannot identify image file)"),
    "png_alpha": ("alpha.png", "b", "decode", "RGBA composited over white: transparent pixels white"),
    "palette_png": ("palette.png", "a", "decode", "P mode: each pixel its palette colour"),
    "png_16bit": ("deep16.png", "b", "decode", "16-bit gray scaled to 8 bits, round(v / 257), R = G = B"),
    "cmyk_jpeg": ("cmyk.jpg", "a", "decode", "CMYK JPEG as RGB, its size kept"),
    "grayscale": ("gray.jpg", "b", "decode", "L mode: R = G = B"),
    "exif_rotated": ("rotated.jpg", "a", "decode", "EXIF orientation 6 NOT applied: the stored 48x24 pixels "
                     "(as torchvision's ImageFolder and the published code's loader read it)"),
    "one_pixel": ("dot.png", "b", "decode", "a 1x1 image, decoded as 1x1 (the crop scales it up)"),
    "decompression_bomb": ("bomb.png", "a", "skip", "a PNG header claiming 60000x60000 pixels (3.6 Gpixel, "
                           "above the 179 Mpixel limit): refused before any pixel is decoded"),
    "unreadable": ("locked.jpg", "b", "skip", "no read permission (mode 000); a process that may read it "
                   "anyway (root) decodes it"),
    "symlink_loop": ("loop.jpg", "a", "skip", "a symbolic link to itself (ELOOP)"),
    "folder_symlink_loop": ("again", "b", "none", "a symbolic link to its own folder: the folder is read once, "
                            "no image listed twice"),
    "named_pipe": ("pipe.jpg", "a", "skip", "a FIFO with an image name: not a regular file, never opened "
                   "(opening it would wait for a writer forever)"),
    "non_utf8_name": (b"caf\xe9.jpg", "b", "decode", "a good JPEG whose file name is not UTF-8 (Latin-1)"),
    "empty_class_folder": ("", "empty", "none", "a class folder without images: the class is kept (its "
                           "label index stays) and contributes no sample"),
}


def _good_pixels(rng: np.random.Generator, h: int = 40, w: int = 48) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(side: int) -> bytes:
    """A valid PNG signature and header for a ``side`` x ``side`` RGB image with one tiny data chunk."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def make_corpus(root: str | os.PathLike, n_good: int = 24, seed: int = 0) -> dict[str, Path]:
    """Write ``n_good`` good JPEGs over ``root/a`` and ``root/b`` and one file per ``EXPECTED`` kind;
    returns kind -> path (as ``os.fsdecode`` names it)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for cls in ("a", "b", "empty"):
        (root / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n_good):
        Image.fromarray(_good_pixels(rng)).save(root / "ab"[i % 2] / f"good{i:03d}.jpg", quality=90)
    paths = {kind: root / cls / os.fsdecode(name) for kind, (name, cls, _, _) in EXPECTED.items()}
    jpeg = io.BytesIO()
    Image.fromarray(_good_pixels(rng, 120, 120)).save(jpeg, format="JPEG")
    paths["truncated_jpeg"].write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    paths["zero_bytes"].write_bytes(b"")
    paths["text_as_jpg"].write_text("shopping list: bread, milk, a new hard disk\n" * 20)
    rgba = np.concatenate([_good_pixels(rng, 36, 36), np.zeros((36, 36, 1), np.uint8)], axis=2)
    rgba[:18, :, 3] = 255  # top half opaque, bottom half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(paths["png_alpha"])
    palette = Image.fromarray(rng.integers(0, 16, (36, 36), dtype=np.uint8), mode="P")
    palette.putpalette([v for i in range(16) for v in (16 * i, 255 - 16 * i, 7 * i)])
    palette.save(paths["palette_png"])
    Image.fromarray(rng.integers(0, 65536, (36, 36)).astype(np.uint16)).save(paths["png_16bit"])
    Image.fromarray(rng.integers(0, 256, (36, 44, 4), dtype=np.uint8), mode="CMYK").save(paths["cmyk_jpeg"])
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8), mode="L").save(paths["grayscale"])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(_good_pixels(rng, 24, 48)).save(paths["exif_rotated"], exif=exif.tobytes())
    Image.fromarray(np.array([[[200, 30, 90]]], np.uint8)).save(paths["one_pixel"])
    paths["decompression_bomb"].write_bytes(_bomb_png(60000))
    Image.fromarray(_good_pixels(rng)).save(paths["unreadable"])
    paths["unreadable"].chmod(0)
    os.symlink(paths["symlink_loop"].name, paths["symlink_loop"])
    os.symlink(".", paths["folder_symlink_loop"])
    os.mkfifo(paths["named_pipe"])
    Image.fromarray(_good_pixels(rng)).save(os.path.join(os.fsencode(root / "b"), EXPECTED["non_utf8_name"][0]))
    return paths


def bad_files(paths: dict[str, Path]) -> dict[str, Path]:
    """The kinds a run must skip and count (``unreadable`` only where this process cannot read it)."""
    return {kind: path for kind, path in paths.items()
            if EXPECTED[kind][2] == "skip" and (kind != "unreadable" or not os.access(path, os.R_OK))}


def check_decoding(root: str | os.PathLike, paths: dict[str, Path]) -> list[str]:
    """Every corpus file against ``EXPECTED`` through ``RobustImageFolder``; the problems found ([] if none)."""
    from fd_ref.data.images import RobustImageFolder

    folder = RobustImageFolder(root)
    problems = []
    listed = [path for path, _ in folder.samples]
    if len(listed) != len(set(os.path.realpath(p) for p in listed)):
        problems.append(f"folder_symlink_loop: {len(listed)} samples, "
                        f"{len(set(os.path.realpath(p) for p in listed))} distinct files")
    if folder.classes != ["a", "b", "empty"]:
        problems.append(f"empty_class_folder: classes {folder.classes}")
    skip = bad_files(paths)
    for kind, path in paths.items():
        if EXPECTED[kind][2] == "none":
            continue
        try:
            image = folder.load(str(path))
        except Exception as err:  # noqa: BLE001 - a skip is any exception
            if kind not in skip:
                problems.append(f"{kind}: expected to decode, raised {type(err).__name__}: {err}")
            continue
        if kind in skip:
            problems.append(f"{kind}: expected a skip, decoded {image.mode} {image.size}")
            continue
        problems += [f"{kind}: {p}" for p in _check_image(kind, path, image)]
    return problems


def _check_image(kind: str, path: Path, image: Image.Image) -> list[str]:
    pixels = np.asarray(image)
    out = [] if image.mode == "RGB" else [f"mode {image.mode}, not RGB"]
    if kind in ("png_16bit", "grayscale") and not (pixels == pixels[..., :1]).all():
        out.append("gray image with R, G, B differing")
    if kind == "png_16bit":
        with Image.open(path) as raw:
            want = np.rint(np.asarray(raw).astype(np.float64) / 257.0).astype(np.uint8)
        if not (pixels[..., 0] == want).all():
            out.append("16-bit values not scaled by 1/257")
    if kind == "png_alpha" and not (pixels[18:] == 255).all():
        out.append("transparent pixels not white")
    if kind == "palette_png":
        with Image.open(path) as raw:
            index = np.asarray(raw)
        want = np.array([(16 * i, 255 - 16 * i, 7 * i) for i in range(16)], np.uint8)[index]
        if not (pixels == want).all():
            out.append("palette colours wrong")
    sizes = {"exif_rotated": (48, 24), "one_pixel": (1, 1), "cmyk_jpeg": (44, 36)}
    if kind in sizes and image.size != sizes[kind]:
        out.append(f"size {image.size}, expected {sizes[kind]}")
    return out
