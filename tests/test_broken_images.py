"""The generated corpus of broken image files (bench/broken_images.py, issue #25): every file decodes as
documented or is skipped and counted; and the two cases the corpus found broken, each with its own test
(a symlink loop listed every image 41 times; a named pipe with an image name blocked the run for good)."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from broken_images import EXPECTED, bad_files, check_decoding, make_corpus  # noqa: E402

from fd_ref.data.images import ImageSkipped, RobustImageFolder, load_rgb  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("corpus") / "mixed"
    return root, make_corpus(root, n_good=8)


def test_every_corpus_file_decodes_as_documented_or_is_skipped(corpus) -> None:
    root, paths = corpus
    assert set(paths) == set(EXPECTED)
    assert check_decoding(root, paths) == []


def test_the_skipped_files_are_counted_once_each(corpus) -> None:
    root, paths = corpus
    folder = RobustImageFolder(root)
    for _ in range(2):  # a second pass meets the same files: no new count
        labels = [folder[i][1] for i in range(len(folder))]
    assert folder.num_skipped == len(bad_files(paths))
    assert set(labels) <= {0, 1} and folder.classes[2] == "empty"


def test_a_symlink_loop_lists_each_image_once(tmp_path: Path) -> None:
    """``cls/again -> .`` made os.walk(followlinks=True) descend cls/again/again/... until the kernel's
    limit of 40 links: every image of the class was a sample 41 times."""
    make_corpus(tmp_path, n_good=4)
    (tmp_path / "a" / "deeper").mkdir()
    os.symlink("..", tmp_path / "a" / "deeper" / "up")  # a loop one level down
    (tmp_path / "a" / "deeper" / "x.png").write_bytes((tmp_path / "b" / "dot.png").read_bytes())
    folder = RobustImageFolder(tmp_path)
    real = [os.path.realpath(p) for p, _ in folder.samples]
    assert len(real) == len(set(real))
    assert str(tmp_path / "a" / "deeper" / "x.png") in [p for p, _ in folder.samples]
    a_files = {f for f in os.listdir(tmp_path / "a") if f.endswith((".jpg", ".png"))}
    assert sum(label == 0 for _, label in folder.samples) == len(a_files) + 1  # + deeper/x.png


def test_a_named_pipe_is_skipped_without_waiting(tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer; PIL's open did, so one such file stopped a run for
    good. Only regular files are opened now."""
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            load_rgb(pipe)
        except BaseException as err:  # noqa: BLE001
            outcome.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    try:
        assert not worker.is_alive(), "load_rgb is blocked on the named pipe"
        assert len(outcome) == 1 and isinstance(outcome[0], ImageSkipped)
        assert "not a regular file" in str(outcome[0])
    finally:
        if worker.is_alive():  # release the blocked open
            os.close(os.open(pipe, os.O_WRONLY))



def test_finetune_counts_the_validation_images_it_skips(tmp_path: Path) -> None:
    """finetune.py's evaluation skipped unreadable validation files (with a warning) but counted them
    nowhere: log.jsonl and the closing note covered the training set only. ``evaluate`` now returns
    ``skipped_val_images`` (summed over ranks), which the epoch's log.jsonl record carries."""
    import numpy as np
    import torch
    from PIL import Image

    import finetune
    from fd_ref.data import eval_transform
    from fd_ref.data.sampler import make_loader

    for cls, bad in (("a", "zero.jpg"), ("b", "notes.jpg")):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(tmp_path / cls / f"good{i}.jpg")
        (tmp_path / cls / bad).write_bytes(b"" if bad == "zero.jpg" else b"not an image")
    folder = RobustImageFolder(tmp_path, eval_transform(32, 0.875))
    names = [os.path.basename(p) for p, _ in folder.samples]
    val = [names.index("zero.jpg"), names.index("notes.jpg"), 0]  # each bad file's successor is good
    loader, _ = make_loader(torch.utils.data.Subset(folder, val), 2, seed=0, shuffle=False, drop_last=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    metrics = finetune.evaluate(model, loader, torch.device("cpu"))
    assert metrics["skipped_val_images"] == 2
    good = torch.utils.data.Subset(RobustImageFolder(tmp_path, eval_transform(32, 0.875)), [0, 1])  # fresh count
    loader, _ = make_loader(good, 2, seed=0, shuffle=False, drop_last=False)
    assert "skipped_val_images" not in finetune.evaluate(model, loader, torch.device("cpu"))


def test_a_split_replaces_a_bad_file_from_within_itself(tmp_path: Path) -> None:
    """With --val-split, a bad training file was replaced by the next file of the whole folder, which
    could be a held-out validation image (trained on), and the other way round; each side also counted
    the other side's bad files it met on the way. Now each split borrows only from itself, and the two
    counts add up to the bad files."""
    import numpy as np
    from PIL import Image

    from fd_ref.data.splits import train_val_datasets

    (tmp_path / "a").mkdir()
    for i in range(14):  # a unique gray level per good file (lossless PNG): an image names its file
        Image.fromarray(np.full((8, 8), 10 * i + 5, np.uint8)).save(tmp_path / "a" / f"{i:02d}.png")
    for name in ("03x.png", "04x.png", "07x.png", "11x.png"):  # bad ones between good ones
        (tmp_path / "a" / name).write_bytes(b"")
    for split_seed in range(6):
        train, val = train_val_datasets(str(tmp_path), None, None, val_split=6, split_seed=split_seed)
        levels = {side: {int(np.asarray(ds[i][0])[0, 0, 0]) for i in range(len(ds))} for side, ds in
                  (("train", train), ("val", val))}
        names = {side: {os.path.basename(train.dataset.samples[i][0]) for i in ds.indices}
                 for side, ds in (("train", train), ("val", val))}
        for side in ("train", "val"):
            own = {10 * int(n[:2]) + 5 for n in names[side] if "x" not in n}
            assert levels[side] <= own, (split_seed, side)  # only its own files' pixels
        assert train.dataset.num_skipped + val.dataset.num_skipped == 4


def _read_as(uid: int | None, root: str, out: str) -> None:
    """In a forked child: become ``uid`` (when given), read every sample of ``root``, write what was seen."""
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    import json
    folder = RobustImageFolder(root)
    names = [os.path.basename(folder.samples[i][0]) for i in range(len(folder))]
    images = [folder[i][0].getpixel((0, 0)) for i in range(len(folder))]
    Path(out).write_text(json.dumps({"skipped": folder.num_skipped, "names": names, "first_pixels": images}))


def test_a_file_without_read_permission_is_skipped_even_under_root(tmp_path: Path) -> None:
    """Mode 000: the open fails with EACCES for an ordinary user; the file is skipped, counted once and replaced
    by the next readable image. Run as root (as CI is), the reading happens in a child that has given up root
    (uid/gid 65534), so the case is real there too, not silently readable."""
    import tempfile

    import numpy as np
    from PIL import Image
    uid = 65534 if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory() as where:  # the system's temporary folder: traversable by every user
        root = Path(where) / "images"
        (root / "c").mkdir(parents=True)
        for folder in (Path(where), root, root / "c"):
            folder.chmod(0o755)
        for name, value in (("0.png", 10), ("1_locked.png", 20), ("2.png", 30)):
            Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(root / "c" / name)
        (root / "c" / "1_locked.png").chmod(0)
        if uid is not None and any(p.stat().st_mode & 0o001 == 0 for p in Path(where).parents):
            pytest.skip(f"{where} is not reachable by other users")
        seen = _read_in_child(uid, root, Path(where) / "seen.json")
    assert seen["skipped"] == 1
    assert seen["first_pixels"] == [[10, 10, 10], [30, 30, 30], [30, 30, 30]]  # the locked one: the next image


def _read_in_child(uid: int | None, root: Path, out: Path) -> dict:
    import json
    import multiprocessing
    out.parent.chmod(0o777)  # the child, as another user, writes its answer there
    child = multiprocessing.get_context("fork").Process(target=_read_as, args=(uid, str(root), str(out)))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    return json.loads(out.read_text())
