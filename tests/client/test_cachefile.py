import contextlib
import copyreg
import errno
import itertools
import multiprocessing as mp
import os
import pickle
import random
from pathlib import Path, PurePosixPath

import pytest
import torch

from vggt_cache.client import cachefile, fastload
from vggt_cache.client.cachefile import (
    CACHE_SUFFIX,
    FORMAT_VERSION,
    Outcome,
    cache_path,
    context_record,
    read_entry,
    source_record,
    write_entry,
)
from vggt_cache.client.safeopen import absolute, atomic_write
from vggt_cache.client.spec import FeatureSpec, short_digest

from helpers.service import tmpfs

ARCH = {"patch_size": 14, "embed_dim": 8, "depth": 4, "num_register_tokens": 4}
GRID = [3, 5]  # 15 patch tokens of 2 * embed_dim = 16 channels


def make_spec(**kw) -> FeatureSpec:
    return FeatureSpec(**{"fingerprint": "sha256:" + "0f" * 32, "architecture": ARCH, **kw})


def make_image(folder: Path, name: str = "img.jpg", content: bytes = b"pixels") -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def features_for(spec: FeatureSpec, fill: float | None = None) -> torch.Tensor:
    shape = (15, 16) if len(spec.layers) == 1 else (len(spec.layers), 15, 16)
    return torch.full(shape, fill) if fill is not None else torch.randn(shape)


def write(image: Path, spec: FeatureSpec, features=None, context=None) -> torch.Tensor:
    features = features_for(spec) if features is None else features
    write_entry(image, features, spec, GRID, source_record(image), context)
    return features


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("layers", [(-2,), (0, 2, 3)])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, dtype, layers, mmap):
    image = make_image(tmp_path)
    spec = make_spec(dtype=dtype, layers=layers)
    original = write(image, spec)
    res = read_entry(image, spec, mmap=mmap)
    assert res.outcome is Outcome.HIT and res.hit and res.reason == ""
    assert res.path == str(image) + CACHE_SUFFIX
    assert res.features.dtype == spec.torch_dtype
    assert torch.equal(res.features, original.to(spec.torch_dtype))
    meta = res.meta
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["spec"] == spec.to_dict() and meta["spec_digest"] == spec.digest
    assert meta["grid"] == GRID and meta["context"] is None
    assert meta["source"] == source_record(image)
    assert meta["shape"] == list(original.shape) and meta["dtype"] == dtype
    assert isinstance(meta["created"], float)
    # Without an expected spec the entry is still validated and returned.
    assert read_entry(image).outcome is Outcome.HIT
    assert torch.load(res.path, weights_only=True)["meta"] == meta


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("mmap", [True, False])
def test_our_files_are_read_without_torch_load(tmp_path, monkeypatch, mmap, dtype):
    image = make_image(tmp_path)
    spec = make_spec(layers=(0, 1), dtype=dtype)
    original = write(image, spec)
    expected_meta = torch.load(cache_path(image), weights_only=True)["meta"]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called on a file of our own layout")

    monkeypatch.setattr(torch, "load", refuse)
    res = read_entry(image, spec, mmap=mmap)
    assert res.hit and torch.equal(res.features, original.to(spec.torch_dtype))
    assert res.meta == expected_meta
    if not mmap:  # read straight into a buffer of its own: no bytes of the file besides the tensor's
        storage = res.features.untyped_storage()
        assert res.features.storage_offset() == 0 and storage.nbytes() == res.features.nbytes


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_read_tensors_hold_no_file_descriptors(tmp_path):
    images = [make_image(tmp_path, f"{i}.jpg") for i in range(20)]
    for image in images:
        write(image, make_spec())
    kept = [read_entry(image, make_spec(), mmap=False).features for image in images]
    # No open descriptor leads to an entry. Told by where each leads, not by their count: an earlier test's objects
    # may close theirs meanwhile (the count fell from 19 to 15 once, in a full run).
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed since it was listed
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    assert not set(held) & {os.path.realpath(cache_path(image)) for image in images}
    assert all(t.shape == (15, 16) for t in kept)


class _Entries(torch.utils.data.Dataset):
    def __init__(self, images, mmap):
        self.images, self.mmap = images, mmap

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return read_entry(self.images[i], make_spec(), mmap=self.mmap).features


@pytest.mark.parametrize("mmap", [True, False])
def test_read_tensors_cross_dataloader_workers(tmp_path, mmap):
    images = [make_image(tmp_path, f"{i}.jpg") for i in range(4)]
    written = [write(image, make_spec()).bfloat16() for image in images]
    loader = torch.utils.data.DataLoader(
        _Entries(images, mmap),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        timeout=60,
    )
    assert all(torch.equal(got, want) for got, want in zip(loader, written, strict=True))


def test_pickle_extension_codes_turn_the_fast_path_off(tmp_path, monkeypatch):
    image = make_image(tmp_path)
    write(image, make_spec())
    monkeypatch.setitem(copyreg._extension_registry, ("some.module", "thing"), 240)
    with pytest.raises(fastload._Unsupported):
        fast_path(cache_path(image), True)
    assert read_entry(image, make_spec()).hit  # through torch.load


def fast_path(path: str, mmap: bool) -> dict:
    with open(path, "rb", buffering=0) as f:
        return fastload._load_fast(f.fileno(), os.fstat(f.fileno()).st_size, mmap, check_crc=False)


@pytest.mark.parametrize("mmap", [True, False])
def test_other_torch_layouts_fall_back_to_torch_load(tmp_path, mmap):
    # A valid entry whose tensor was saved with requires_grad: outside the fast path.
    image = make_image(tmp_path)
    spec = make_spec()
    write(image, spec)
    data = torch.load(cache_path(image), weights_only=True)
    data["features"] = data["features"].clone().requires_grad_(True)
    torch.save(data, cache_path(image))
    with pytest.raises(fastload._Unsupported):
        fast_path(cache_path(image), mmap)
    res = read_entry(image, spec, mmap=mmap)
    assert res.hit and torch.equal(res.features, data["features"])


@pytest.mark.parametrize("mmap", [True, False])
def test_a_tensor_viewing_a_larger_storage_is_corrupt_on_every_path(tmp_path, mmap):
    # torch.save writes the whole storage: the file would pin (and mmap=False read) all of it.
    image = make_image(tmp_path)
    spec = make_spec()
    write(image, spec)
    data = torch.load(cache_path(image), weights_only=True)
    data["features"] = torch.randn(2, 15, 16).bfloat16()[1]
    torch.save(data, cache_path(image))
    res = read_entry(image, spec, mmap=mmap)
    assert res.outcome is Outcome.CORRUPT and "storage" in res.reason


def test_seed_loader_reads_our_files(tmp_path):
    image = make_image(tmp_path)
    original = write(image, make_spec())
    path = cache_path(image)
    assert path == f"{image}.vggt_cache.pt"
    seed_read = torch.load(path, map_location="cpu")  # the seed's exact call; weights_only by default
    assert torch.equal(seed_read["features"], original.bfloat16())
    assert torch.equal(torch.load(path, map_location="cpu", weights_only=True)["features"], original.bfloat16())


def test_a_view_is_stored_without_its_base(tmp_path):
    image = make_image(tmp_path)
    batch = torch.randn(64, 15, 16, dtype=torch.bfloat16)  # 30 KiB
    write(image, make_spec(), features=batch[7])
    assert os.path.getsize(cache_path(image)) < batch[7].nbytes + 4096
    assert torch.equal(read_entry(image).features, batch[7])


def test_all_tokens_include_camera_and_registers(tmp_path):
    image = make_image(tmp_path)
    spec = make_spec(tokens="all")
    write(image, spec, features=torch.randn(15 + 5, 16))
    assert read_entry(image, spec).hit
    with pytest.raises(ValueError, match="expected \\[20, 16\\]"):
        write(image, spec, features=torch.randn(15, 16))


def test_missing(tmp_path):
    res = read_entry(make_image(tmp_path), make_spec())
    assert res.outcome is Outcome.MISSING and res.features is None


@pytest.mark.parametrize("keep", [lambda n: 0, lambda n: 10, lambda n: n // 2, lambda n: n - 1])
def test_truncated_file_is_corrupt(tmp_path, keep):
    image = make_image(tmp_path)
    write(image, make_spec())
    data = Path(cache_path(image)).read_bytes()
    Path(cache_path(image)).write_bytes(data[: keep(len(data))])
    for mmap in (True, False):
        res = read_entry(image, make_spec(), mmap=mmap)
        assert res.outcome is Outcome.CORRUPT, res.reason
        assert res.features is None and res.reason


def test_other_spec_is_a_mismatch(tmp_path):
    image = make_image(tmp_path)
    write(image, make_spec())
    res = read_entry(image, make_spec(attention="frame", dtype="float16"))
    assert res.outcome is Outcome.SPEC_MISMATCH
    assert "dtype" in res.reason and res.features is None
    assert res.meta["spec"]["dtype"] == "bfloat16"
    assert read_entry(image, make_spec(layers=[2])).outcome is Outcome.HIT  # -2 == 2 for depth 4


def test_rewritten_image_is_stale(tmp_path):
    image = make_image(tmp_path)
    write(image, make_spec())
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    res = read_entry(image, make_spec())
    assert res.outcome is Outcome.STALE and "changed" in res.reason

    write(image, make_spec())
    image.write_bytes(b"other pixels, longer")
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert read_entry(image, make_spec()).outcome is Outcome.STALE

    write(image, make_spec())
    image.unlink()
    assert read_entry(image, make_spec()).outcome is Outcome.STALE


def test_context_record_paths_and_digest(tmp_path):
    (tmp_path / "scene" / "prev").mkdir(parents=True)
    frames = [make_image(tmp_path / "scene" / "prev", "a.jpg"), make_image(tmp_path / "scene", "b.jpg")]
    record = context_record(frames[-1], [str(f) for f in frames])
    assert [r["path"] for r in record["frames"]] == [os.path.join("prev", "a.jpg"), "b.jpg"]
    assert record["frames"][0]["size"] == len(b"pixels")
    assert record["digest"] == short_digest(record["frames"])
    assert context_record(frames[-1], None) is None
    with pytest.raises(ValueError):
        context_record(frames[-1], [])


def test_a_path_taken_as_it_is_is_its_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    segments = ["a", "b.jpg", ".", "..", "", ".h", "c d", "x..y", "e."]
    paths = ["/".join(p) for n in (1, 2, 3, 4) for p in itertools.product(segments, repeat=n)]
    for path in [*paths, "/", "//", "///a", "//a/b"]:
        assert absolute(path) == os.path.abspath(path), path
        assert absolute(PurePosixPath(path or ".")) == os.path.abspath(path or "."), path


def test_context(tmp_path):
    frames = [make_image(tmp_path, f"{i}.jpg", bytes([i]) * 10) for i in range(3)]
    target = frames[-1]
    spec = make_spec(attention="causal")
    write(target, spec, context=context_record(target, frames))
    assert read_entry(target, spec, context_frames=frames).hit
    assert read_entry(target, spec).hit  # recorded frames re-checked on disk

    res = read_entry(target, spec, context_frames=[frames[0], frames[2]])
    assert res.outcome is Outcome.STALE and "differ" in res.reason

    st = os.stat(frames[1])
    os.utime(frames[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert read_entry(target, spec, context_frames=frames).outcome is Outcome.STALE
    res = read_entry(target, spec)
    assert res.outcome is Outcome.STALE and "1.jpg" in res.reason

    frames[0].unlink()
    assert read_entry(target, spec, context_frames=frames).outcome is Outcome.STALE


@pytest.mark.parametrize("tokens", [120, 200, 340])  # files of about 1.1, 1.7 and 2.8 read windows
def test_files_around_the_read_windows_size_read_whole(tmp_path, tokens):
    image = make_image(tmp_path)
    spec = make_spec(dtype="float32")
    features = torch.randn(tokens, 16)
    write_entry(image, features, spec, [1, tokens], source_record(image))
    assert fastload._WINDOW < os.path.getsize(cache_path(image)) < 3 * fastload._WINDOW
    for mmap in (True, False):
        res = read_entry(image, spec, mmap=mmap)
        assert res.hit and torch.equal(res.features, features)
    assert read_entry(image, spec, tensor=False).meta["shape"] == [tokens, 16]


@pytest.mark.parametrize("mmap", [True, False])
def test_metadata_past_the_read_windows_is_read_where_it_lies(tmp_path, mmap):
    # A clip of 300 long-named frames: data.pkl is several times the head window.
    frames = [make_image(tmp_path, f"{i:04d}_{'x' * 80}.jpg", bytes([i % 256]) * 10) for i in range(300)]
    spec = make_spec(attention="causal")
    original = write(frames[-1], spec, context=context_record(frames[-1], frames))
    assert os.path.getsize(cache_path(frames[-1])) > 4 * fastload._WINDOW
    res = read_entry(frames[-1], spec, context_frames=frames, mmap=mmap)
    assert res.hit and torch.equal(res.features, original.to(spec.torch_dtype))
    assert read_entry(frames[-1], spec, context_frames=frames, tensor=False).hit


def test_frame_entry_given_a_clip_is_a_mismatch(tmp_path):
    image = make_image(tmp_path)
    write(image, make_spec())
    res = read_entry(image, make_spec(), context_frames=[image])
    assert res.outcome is Outcome.SPEC_MISMATCH and "no context" in res.reason


def test_write_validation(tmp_path):
    image = make_image(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        write(image, make_spec(), features=torch.randn(14, 16))
    with pytest.raises(ValueError, match="shape"):
        write(image, make_spec(layers=[0, 1]), features=torch.randn(3, 15, 16))
    with pytest.raises(ValueError, match="needs a context"):
        write(image, make_spec(attention="sequence"))
    with pytest.raises(ValueError, match="takes no context"):
        write(image, make_spec(), context=context_record(image, [image]))
    with pytest.raises(TypeError):
        write(image, make_spec(), features=[[0.0] * 16] * 15)
    assert not Path(cache_path(image)).exists()


def test_a_full_disk_fails_a_write_with_the_disks_error_and_leaves_no_temp_file(tmp_path):
    # torch.save reports a short write as "unexpected pos"; the entry's failure must say ENOSPC.
    if os.sysconf("SC_PAGE_SIZE") != 4096:
        pytest.skip("sized for 4 kB pages: a tmpfs gives each small file a page")
    with tmpfs(tmp_path / "disk", "192k") as disk:  # 24 small images (a 4 kB page each), the rest for entries
        errors = set()
        sizes = range(16, 40)  # entries of 18-41 kB: the last bytes of the disk end mid-write
        images = {size: make_image(disk, f"{size}.jpg") for size in sizes}
        for size, image in images.items():
            features = torch.randn(size * 16, 16)
            try:
                write_entry(image, features, make_spec(dtype="float32"), [size * 4, 4], source_record(image))
            except OSError as e:
                errors.add(e.errno)
        assert errors == {errno.ENOSPC}
        assert not [p.name for p in disk.iterdir() if ".tmp" in p.name]


def test_an_os_error_a_writer_masks_is_the_one_raised(tmp_path):
    def masking(f) -> None:
        try:
            f.write(b"x" * 200_000)
            f.flush()
        except OSError as e:
            raise RuntimeError("unexpected pos") from e

    with tmpfs(tmp_path / "disk", "64k") as disk, pytest.raises(OSError) as raised:
        atomic_write(str(disk / "big"), masking)
    assert raised.value.errno == errno.ENOSPC
    assert list(disk.iterdir()) == []


class Payload:
    """Unpickling this runs `_touch(marker)`: stands in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(path: str) -> None:
    Path(path).write_text("executed")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle", "inside-entry"])
def test_executable_payload_is_corrupt_and_never_runs(tmp_path, how):
    image = make_image(tmp_path)
    marker = tmp_path / "marker"
    payload = Payload(str(marker))
    path = cache_path(image)
    if how == "pickle":
        Path(path).write_bytes(pickle.dumps({"features": torch.zeros(2), "meta": payload}))
    elif how == "torch.save":
        torch.save({"features": torch.zeros(15, 16), "meta": payload}, path)
    else:
        write(image, make_spec())
        data = torch.load(path, weights_only=True)
        data["meta"]["spec"]["architecture"] = payload
        torch.save(data, path)
    for mmap in (True, False):
        res = read_entry(image, make_spec(), mmap=mmap)
        assert res.outcome is Outcome.CORRUPT and res.features is None
        # The fast path refuses it on its own, before torch.load is asked.
        with pytest.raises(fastload._Unsupported, match="zip" if how == "pickle" else "global"):
            fast_path(path, mmap)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it.
    if how == "pickle":
        pickle.loads(Path(path).read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda d: d.pop("meta"), "no 'meta'"),
        (lambda d: d.update(features=[1, 2]), "no 'features'"),
        (lambda d: d["meta"].update(format_version=2), "format_version"),
        (lambda d: d["meta"].update(format_version=True), "format_version"),
        (lambda d: d["meta"].pop("source"), "lacks source"),
        (lambda d: d["meta"].update(spec_digest="0" * 16), "spec_digest"),
        (lambda d: d["meta"]["spec"].update(tokens="cls"), "invalid spec"),
        (lambda d: d["meta"].update(shape=[15, 15]), "meta shape"),
        (lambda d: d.update(features=d["features"].float()), "dtype"),
        (lambda d: d.update(features=d["features"][:14].clone()), "shape"),
        (lambda d: d["meta"].update(grid=[3, "5"]), "grid"),
        (lambda d: d["meta"].update(context={"frames": []}), "context"),
        (lambda d: d["meta"].update(source={"size": 1}), "source"),
    ],
)
def test_foreign_or_inconsistent_structure_is_corrupt(tmp_path, tamper, reason):
    image = make_image(tmp_path)
    write(image, make_spec())
    path = cache_path(image)
    data = torch.load(path, weights_only=True)
    tamper(data)
    torch.save(data, path)
    res = read_entry(image, make_spec())
    assert res.outcome is Outcome.CORRUPT
    assert reason in res.reason


@pytest.mark.parametrize("content", [b"", b"hello, not a torch file", b"PK\x03\x04" + b"\0" * 64])
def test_garbage_is_corrupt(tmp_path, content):
    image = make_image(tmp_path)
    Path(cache_path(image)).write_bytes(content)
    assert read_entry(image, make_spec()).outcome is Outcome.CORRUPT


def test_damaged_bytes_never_raise(tmp_path):
    image = make_image(tmp_path)
    write(image, make_spec())
    path = Path(cache_path(image))
    original = path.read_bytes()
    rng = random.Random(0)
    outcomes = set()
    for i in range(150):
        damaged = bytearray(original)
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(damaged))
        res = read_entry(image, make_spec(), mmap=i % 2 == 0)
        outcomes.add(res.outcome)
        assert res.features is None or res.features.shape == (15, 16)
    assert Outcome.CORRUPT in outcomes


def test_temp_file_naming_and_cleanup(tmp_path, monkeypatch):
    image = make_image(tmp_path)
    seen = []
    real_replace = os.replace

    def failing_replace(src, dst, **kwargs):
        name = os.path.basename(src)
        # The temporary file is complete and sits in the image's folder.
        assert name in os.listdir(tmp_path)
        seen.append((name, os.path.basename(dst)))
        raise OSError("simulated failure")

    monkeypatch.setattr(cachefile.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write(image, make_spec())
    ((tmp_name, dst),) = seen
    assert dst == os.path.basename(cache_path(image))
    assert not tmp_name.endswith(CACHE_SUFFIX)
    assert list(tmp_path.iterdir()) == [image]  # temp file removed, nothing published

    monkeypatch.setattr(cachefile.os, "replace", real_replace)
    write(image, make_spec())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.jpg", "img.jpg.vggt_cache.pt"]


# Concurrency: two writers replace the same entry while a reader reads it.

WRITES = 60


def _writer(image: str, first_value: int, barrier) -> None:
    spec = make_spec()
    source = source_record(image)
    barrier.wait(timeout=60)
    for i in range(WRITES):
        features = features_for(spec, float(first_value + 2 * i))  # exact in bfloat16
        write_entry(image, features, spec, GRID, source)


def _reader(image: str, barrier, stop, results) -> None:
    spec = make_spec()
    bad, values, reads = [], set(), 0
    barrier.wait(timeout=60)
    while not stop.is_set() and reads < 20_000:
        res = read_entry(image, spec, mmap=reads % 2 == 0)
        reads += 1
        if not res.hit:
            bad.append(f"{res.outcome}: {res.reason}")
        elif res.features.min() != res.features.max():
            bad.append("mixed content")
        else:
            values.add(float(res.features[0, 0]))
    results.put((reads, bad[:5], len(bad), sorted(values)))


def test_concurrent_writers_and_reader_see_only_whole_entries(tmp_path):
    image = str(make_image(tmp_path))
    write_entry(image, features_for(make_spec(), 0.0), make_spec(), GRID, source_record(image))
    ctx = mp.get_context("spawn")
    barrier, stop, results = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(image, v, barrier)) for v in (1, 2)]
    reader = ctx.Process(target=_reader, args=(image, barrier, stop, results))
    for p in (*writers, reader):
        p.start()
    try:
        for p in writers:
            p.join(timeout=120)
            assert p.exitcode == 0
        stop.set()
        reader.join(timeout=60)  # the result is small: it fits the pipe, so join cannot block on it
        assert reader.exitcode == 0
        reads, bad, n_bad, values = results.get(timeout=10)
    finally:
        for p in (*writers, reader):
            if p.is_alive():
                p.kill()
    assert n_bad == 0, bad
    assert reads > 0 and len(values) >= 2, (reads, values)
    assert set(values) <= {0.0, *range(1, 2 * WRITES + 1)}
    assert read_entry(image, make_spec()).features[0, 0] in (2 * WRITES - 1, 2 * WRITES)
    assert sorted(os.listdir(tmp_path)) == ["img.jpg", "img.jpg.vggt_cache.pt"]


def test_a_pickle_cannot_alter_what_the_fast_path_unpickles_with():
    import io

    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD (None, {"storage": 0}) on it.
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}\x8c\x07storageK\x00s\x86b."
    field = fastload._TensorRef.storage
    with pytest.raises(fastload._Unsupported):
        fastload._RestrictedUnpickler(io.BytesIO(payload)).load()
    assert fastload._TensorRef.storage is field


def test_a_metadata_check_reads_a_few_kilobytes_and_judges_like_a_full_read(tmp_path, monkeypatch):
    image = make_image(tmp_path)
    spec = make_spec(dtype="float32")
    write_entry(image, torch.randn(40 * 40, 16), spec, [40, 40], source_record(image))  # 100 KB of tensor
    size = os.path.getsize(cache_path(image))
    read = []
    real_pread = os.pread

    def counting_pread(fd, n, offset):
        read.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(fastload.os, "pread", counting_pread)
    res = read_entry(image, spec, tensor=False)
    assert res.hit and res.features is None and res.meta["shape"] == [1600, 16]
    assert len(read) == 2 and sum(read) == 2 * fastload._WINDOW  # the head and the tail, never the tensor
    assert read_entry(image, make_spec(dtype="float16"), tensor=False).outcome is Outcome.SPEC_MISMATCH
    with open(cache_path(image), "r+b") as f:
        f.truncate(size - 100)
    assert read_entry(image, spec, tensor=False).outcome is Outcome.CORRUPT


@pytest.mark.parametrize("record", ["data.pkl", "data/0", "version"])
def test_a_damaged_local_header_matters_only_for_a_record_read(tmp_path, monkeypatch, record):
    image = make_image(tmp_path)
    spec = make_spec()
    write(image, spec)
    path = cache_path(image)
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "rb") as f:
        header = fastload._zip_records(lambda offset, n: os.pread(f.fileno(), n, offset), len(blob))[record].header
    with open(path, "r+b") as f:
        f.seek(header)
        f.write(b"PK\x09\x09")  # not a local header's signature
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    res = read_entry(image, spec, tensor=False)
    if record == "version":  # never read by the fast path, which reads the entry as it was
        assert res.hit and not loads
    else:  # outside the fast path: torch.load, which refuses it too
        assert loads and res.outcome is Outcome.CORRUPT, res


def test_a_length_a_pickle_claims_is_not_allocated():
    import io
    import struct

    # BINUNICODE8 of 1 TiB, then three bytes: read by asking the file for 1 TiB.
    payload = b"\x80\x04\x8d" + struct.pack("<Q", 1 << 40) + b"abc"
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        fastload._RestrictedUnpickler(fastload._PickleBytes(payload)).load()
    assert fastload._PickleBytes(b"abcdef").read(1 << 40) == b"abcdef"
    assert io.BytesIO(payload).read() == payload  # the test's pickle is what it says
