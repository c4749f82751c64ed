import json
import os
from pathlib import Path

import pytest

from vggt_cache.client.manifest import MANIFEST_NAME, MAX_FAILURES, read_manifest, write_manifest


def test_missing_manifest_reads_as_none(tmp_path):
    assert read_manifest(str(tmp_path)) is None


def test_manifest_round_trips_and_replaces_the_previous_one(tmp_path):
    record = {
        "job_id": "ab" * 16,
        "counts": {"total": 3, "computed": 2, "skipped": 0, "failed": 1},
        "spec": {"attention": "frame", "layers": [22]},
        "model": {"source": "facebook/VGGT-1B", "fingerprint": "sha256:00"},
        "timing": {"seconds": 1.5, "images_per_second": 2.0},
        "failures": [("/d/x.jpg", "ImageError: truncated")],
    }
    write_manifest(str(tmp_path), {**record, "failures": []})
    path = write_manifest(str(tmp_path), record)
    assert path == os.path.join(tmp_path, MANIFEST_NAME)
    body = read_manifest(str(tmp_path))
    assert body == json.loads(Path(path).read_text())
    assert body["counts"] == record["counts"] and body["spec"] == record["spec"]
    assert body["failures"] == [{"image": "/d/x.jpg", "reason": "ImageError: truncated"}]
    assert body["failures_omitted"] == 0 and body["manifest_version"] == 1
    assert os.listdir(tmp_path) == [MANIFEST_NAME]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_failures_are_capped_with_a_count_of_the_rest(tmp_path):
    failures = [{"image": f"/d/{i}.jpg", "reason": "bad"} for i in range(MAX_FAILURES + 5)]
    write_manifest(str(tmp_path), {"failures": failures})
    body = read_manifest(str(tmp_path))
    assert body["failures"] == failures[:MAX_FAILURES]
    assert body["failures_omitted"] == 5


def test_an_unserialisable_record_leaves_the_old_manifest_untouched(tmp_path):
    write_manifest(str(tmp_path), {"counts": {"total": 1}})
    with pytest.raises(TypeError):
        write_manifest(str(tmp_path), {"counts": object()})
    assert read_manifest(str(tmp_path))["counts"] == {"total": 1}
    assert os.listdir(tmp_path) == [MANIFEST_NAME]


@pytest.mark.parametrize("text", ['{"counts": ', "[1, 2]"])
def test_a_corrupt_manifest_is_a_clear_value_error(tmp_path, text):
    (tmp_path / MANIFEST_NAME).write_text(text)
    with pytest.raises(ValueError, match=f"corrupt manifest .*{MANIFEST_NAME}"):
        read_manifest(str(tmp_path))


def test_a_record_of_the_first_failures_counts_the_ones_it_left_out(tmp_path):
    listed = [{"image": f"/d/{i}.jpg", "reason": "bad"} for i in range(3)]
    write_manifest(str(tmp_path), {"failed": 5000, "failures": listed})
    body = read_manifest(str(tmp_path))
    assert body["failures"] == listed and body["failures_omitted"] == 4997
