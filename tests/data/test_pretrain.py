"""Ray Data pre-training sources: every source kind, bad files, empty sources, streaming_split."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from glare.data.pretrain import DataError, build_pretrain_dataset, decode_image, open_pretrain_data, skipped_images

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _colour(k: int) -> tuple[int, int, int]:
    """A colour that identifies image ``k`` after resizing (solid images stay solid)."""
    return (10 + 20 * k, 250 - 20 * k, 7 * k)


def _solid(k: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    """Solid image ``k`` in a PIL mode (an adaptive palette keeps "P" images solid)."""
    image = Image.new("RGB", size, _colour(k))
    return image.convert(mode, palette=Image.Palette.ADAPTIVE) if mode == "P" else image.convert(mode)


def _png_bytes(k: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    _solid(k, size, mode).save(buf, format="PNG")
    return buf.getvalue()


def _ids(images: np.ndarray) -> list[int]:
    """Recover each solid image's k from its top-left pixel."""
    return sorted((int(px[0]) - 10) // 20 for px in images[:, 0, 0])


def _write_good(folder: Path, ks: range) -> list[Path]:
    paths = []
    for k in ks:
        path = folder / f"img{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(k))
        paths.append(path)
    return paths


def test_decode_image_resizes_short_side_and_centre_crops() -> None:
    buf = io.BytesIO()
    left_right = np.zeros((20, 40, 3), np.uint8)
    left_right[:, 20:] = 200  # right half bright
    Image.fromarray(left_right).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    # 20x40 -> 10x20, centre crop keeps columns 5..14: dark left half, bright right half.
    assert (out[:, :4] == 0).all() and (out[:, 6:] == 200).all()


def test_folder_source_decodes_every_mode_and_skips_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "0.png").write_bytes(_png_bytes(0, (24, 16)))
    (tmp_path / "a" / "b" / "1.PNG").write_bytes(_png_bytes(1, (20, 30), "L"))
    (tmp_path / "2.png").write_bytes(_png_bytes(2, (40, 40), "RGBA"))
    (tmp_path / "3.bmp").write_bytes(_png_bytes(3, (9, 9), "P"))  # PNG bytes in a .bmp: PIL sniffs the format
    Image.fromarray(skimage.data.chelsea()).save(tmp_path / "cat.jpg")
    (tmp_path / "notes.md").write_text("not an image and not an image extension: ignored")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(_png_bytes(4, (64, 64))[:60])
    text_jpg = tmp_path / "text.jpg"
    text_jpg.write_text("this is not a JPEG")

    ds = build_pretrain_dataset(str(tmp_path), base_size=12, materialize=True)
    images = np.stack([row["image"] for row in ds.take_all()])
    assert images.shape == (5, 12, 12, 3) and images.dtype == np.uint8
    photo = [img for img in images if not (img == img[0, 0]).all()]
    assert len(photo) == 1  # the cat; the four solid images keep their exact colours
    solid = np.stack([img for img in images if (img == img[0, 0]).all()])
    colours = sorted(tuple(int(v) for v in img[0, 0]) for img in solid)
    modes = {0: "RGB", 1: "L", 2: "RGBA", 3: "P"}
    expected = [tuple(int(v) for v in _solid(k, mode=m).convert("RGB").getpixel((0, 0))) for k, m in modes.items()]
    assert colours == sorted(expected)
    assert ds.num_blocks() >= 2  # a small set still gets parallel blocks

    skipped = dict(skipped_images(str(tmp_path)))
    assert sorted(skipped) == sorted([str(truncated), str(text_jpg)])  # skipped, counted and named
    assert "UnidentifiedImageError" in skipped[str(text_jpg)]
    assert " at 0x" not in skipped[str(text_jpg)]  # the same reason on every run: no memory address
    assert "truncated" in skipped[str(truncated)]


def test_glob_source_matches_only_the_pattern(tmp_path: Path) -> None:
    _write_good(tmp_path, range(3))
    _write_good(tmp_path / "sub", range(3, 5))
    ds = build_pretrain_dataset(str(tmp_path / "**" / "img[34].png"), base_size=8)
    assert _ids(np.stack([r["image"] for r in ds.take_all()])) == [3, 4]


def test_txt_list_with_relative_absolute_and_missing_entries(tmp_path: Path) -> None:
    good = _write_good(tmp_path / "imgs", range(3))
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# comment\n../imgs/img0.png\n\n{good[1]}\n../imgs/img2.png\n../imgs/gone.png\n")
    ds = build_pretrain_dataset(str(listing), base_size=8)
    assert _ids(np.stack([r["image"] for r in ds.take_all()])) == [0, 1, 2]
    skipped = skipped_images(str(listing))
    assert [name for name, _ in skipped] == [str(listing.parent / "../imgs/gone.png")]
    assert skipped[0][1].startswith("FileNotFoundError")


def test_parquet_source_reads_bytes_and_struct_columns(tmp_path: Path) -> None:
    path = tmp_path / "images.parquet"
    rows = [_png_bytes(k) for k in range(4)] + [b"garbage"]
    structs = [{"bytes": b, "path": f"{k}.png"} for k, b in enumerate(rows)]
    pq.write_table(pa.table({"img": rows, "hf": structs, "label": list(range(5))}), path)

    for column in ("img", "hf"):
        ds = build_pretrain_dataset(str(path), base_size=8, image_column=column, materialize=True)
        assert _ids(np.stack([r["image"] for r in ds.take_all()])) == [0, 1, 2, 3]
    skipped = skipped_images(str(path))
    assert len(skipped) == 1 and skipped[0][0].startswith(f"{path}#sha1=")  # one bad row, named once

    with pytest.raises(DataError, match="no column 'pixels'.*img, hf, label"):
        build_pretrain_dataset(str(path), base_size=8, image_column="pixels")
    with pytest.raises(DataError, match="column 'label' has type int64"):
        build_pretrain_dataset(str(path), base_size=8, image_column="label")


def test_missing_and_empty_sources_raise(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.txt").write_text("no images here")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    pq.write_table(pa.table({"image": pa.array([], pa.binary())}), tmp_path / "empty.parquet")
    cases = {
        str(tmp_path / "nope"): "not found",
        str(tmp_path / "nope.parquet"): "not found",
        str(tmp_path / "empty"): "no images",
        str(tmp_path / "docs"): "no images",
        str(tmp_path / "empty.txt"): "names no images",
        str(tmp_path / "*.jpg"): "no files match",
        str(tmp_path / "empty.parquet"): "no rows",
        str(tmp_path / "docs" / "readme.txt"): "none of the 1 files listed",
    }
    for source, message in cases.items():
        with pytest.raises(DataError, match=message):
            build_pretrain_dataset(source, base_size=8)


def test_all_files_corrupt_raises_when_materialized(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_text("text, not a JPEG")
    (tmp_path / "b.png").write_bytes(_png_bytes(0)[:40])
    with pytest.raises(DataError, match="could be decoded") as err:
        build_pretrain_dataset(str(tmp_path), base_size=8, materialize=True)
    assert str(tmp_path / "a.jpg") in str(err.value) and str(tmp_path / "b.png") in str(err.value)
    assert len(skipped_images(str(tmp_path))) == 2


def test_auto_materialises_what_fits_the_object_store_and_streams_the_rest(tmp_path: Path) -> None:
    """The fixture's store is 256 MiB: 6 images at 8 px fit in half of it, at 3000 px (162 MB) they do not."""
    _write_good(tmp_path, range(6))
    small = open_pretrain_data(str(tmp_path), base_size=8)
    assert small.materialized and small.num_images == 6 and small.dataset.count() == 6
    assert small.summary().startswith("6 unlabelled images, materialised (data.materialize=auto: 0.0 MB decoded "
                                      "fits in 50% of the 0.27 GB object store")
    large = open_pretrain_data(str(tmp_path), base_size=3000)
    assert not large.materialized and "0.16 GB decoded exceeds 50% of the 0.27 GB object store" in large.reason
    assert "streamed" in large.summary()
    forced = open_pretrain_data(str(tmp_path), base_size=8, materialize="false")
    assert not forced.materialized and _ids(np.stack(forced.dataset.to_pandas()["image"])) == list(range(6))


def test_streaming_split_gives_two_consumers_disjoint_shards_covering_the_set(tmp_path: Path) -> None:
    _write_good(tmp_path, range(10))
    ds = build_pretrain_dataset(str(tmp_path), base_size=8, materialize=True)
    shards = ds.streaming_split(2, equal=True)
    seen: list[list[int]] = [[], []]

    def consume(rank: int) -> None:
        for batch in shards[rank].iter_torch_batches(batch_size=5, drop_last=True):
            assert batch["image"].shape == (5, 8, 8, 3)
            seen[rank] += _ids(batch["image"].numpy())

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(seen[0]) == len(seen[1]) == 5
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(10))


def test_each_epoch_is_shuffled_by_seed_epoch_and_rank(tmp_path: Path) -> None:
    from glare.data.pretrain import shuffled_batches

    _write_good(tmp_path, range(12))
    ds = build_pretrain_dataset(str(tmp_path), 8, materialize=True)

    def order(epoch: int, seed: int = 0, rank: int = 0, buffer: int = 64) -> list[int]:
        batches = shuffled_batches(ds.iterator(), 4, seed=seed, epoch=epoch, rank=rank, buffer=buffer)
        return [(int(px[0]) - 10) // 20 for b in batches for px in b["image"][:, 0, 0].numpy()]

    stored = order(0, buffer=0)
    assert sorted(stored) == list(range(12))
    first = order(0)
    assert sorted(first) == list(range(12)) and first != stored
    assert order(0) == first  # a resumed run replays the epoch it stopped in
    assert order(1) != first and sorted(order(1)) == list(range(12))
    assert order(0, seed=1) != first and order(0, rank=1) != first


def test_two_builds_of_a_set_yield_its_images_in_the_same_order(tmp_path: Path) -> None:
    # Blocks in file order, not in the order their decode tasks finish: a seeded run is repeatable.
    from glare.data.pretrain import shuffled_batches

    paths = _write_good(tmp_path, range(32))

    def order() -> list[int]:
        ds = build_pretrain_dataset(str(tmp_path), 8, materialize=True)
        batches = shuffled_batches(ds.iterator(), 4, seed=0, epoch=0, rank=0, buffer=0)
        return [round(int(px[2]) / 7) for b in batches for px in b["image"][:, 0, 0].numpy()]  # blue = 7k

    first = order()
    assert first == [int(p.stem[3:]) for p in sorted(paths)]  # the files' sorted order
    assert all(order() == first for _ in range(3))
