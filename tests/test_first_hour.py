"""Issue 19, the first hour on a CPU: what a newcomer following the README hit, each as it behaves now.

Real services on 127.0.0.1 and real `vggt-cache` processes (see service/test_cli_errors.py for the CLI's error style).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from helpers.cli import cli, one_error
from helpers.service import TINY_MODEL, free_port, write_images


def test_tiny_is_the_one_shipped_model_that_every_entry_point_takes(tmp_path: Path) -> None:
    from vggt_cache.service.model import TINY_SOURCE, identify_model
    from vggt_cache.service.model.loader import TINY_DIR
    from vggt_cache.training.arguments import ModelArguments
    from vggt_cache.training.train import vggt_source

    tiny = identify_model(TINY_SOURCE)
    # The package's own bytes (no download), the very weights the tests' fixture names.
    assert Path(tiny.source).parent == Path(TINY_DIR) and Path(TINY_DIR).is_relative_to(Path(__file__).parents[1])
    assert tiny.fingerprint == identify_model(TINY_MODEL).fingerprint
    assert vggt_source(ModelArguments(tiny=True)) == TINY_SOURCE
    write_images(tmp_path / "data", ["a.png"])
    run = cli(
        "precompute",
        "--data_root",
        str(tmp_path / "data"),
        "--vggt_model_path",
        "tiny",
        "--device",
        "cpu",
        "--size",
        "56",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert run.returncode == 0, run.stdout
    assert "finished: 1 total, 1 computed, 0 skipped, 0 failed" in run.stdout


def test_a_service_of_another_spec_is_named_as_the_cause_with_a_command_for_this_machine(
    tmp_path: Path, service_server, caplog
) -> None:
    from vggt_cache.service.model import load_aggregator
    from vggt_cache.training.arguments import CacheArguments, DataArguments, feature_spec
    from vggt_cache.training.train import open_cache, serve_command

    clip = write_images(tmp_path, [f"step_{n}_MOVE_FORWARD.png" for n in range(2)])
    service = service_server(tmp_path)  # frame attention; training's default is causal (newjanusvln)
    cache_args = CacheArguments(use_vggt_cache=True, vggt_service_url=service.url, vggt_cache_fallback="online")
    spec = feature_spec(load_aggregator("tiny"), DataArguments(image_size=56), cache_args)
    serve = serve_command(spec, "tiny", str(tmp_path))
    assert "--device" not in serve  # auto: every GPU, else the CPU, whatever machine runs it
    with caplog.at_level(logging.WARNING, logger="vggt_cache"):
        cache = open_cache(cache_args, spec, serve)
        assert cache.get_sample(clip) is None  # computed online
    text = caplog.text
    assert "computes features with another spec than this run (differs in: attention" in text
    assert f"the service at {service.url} computes another spec" in text
    assert "no service_url was given" not in text


def test_spec_flags_given_with_server_must_name_the_services_spec(tmp_path: Path, service_server) -> None:
    write_images(tmp_path / "ep_1", ["step_0_STOP.png"])
    service = service_server(tmp_path, "--preset", "newjanusvln")
    line = one_error(
        cli("precompute", "--data_root", str(tmp_path), "--server", service.url, "--preset", "janusvln", "--dry-run"),
        f"the service at {service.url} computes another spec than the flags given",
    )
    assert "preprocess crop here, pad there" in line and "reference_frame first here, last there" in line
    assert "size 644 here, 56 there" in line and "--preset janusvln" in line
    same = cli(
        "precompute",
        "--data_root",
        str(tmp_path),
        "--server",
        service.url,
        "--preset",
        "newjanusvln",
        "--size",
        "56",
        "--dry-run",
    )
    assert same.returncode == 0 and "[ERROR]" not in same.stdout, same.stdout


def test_every_unavailable_message_names_the_last_failure(tmp_path: Path) -> None:
    from vggt_cache.client import FeatureCache
    from vggt_cache.client.cache import CacheUnavailable
    from vggt_cache.service.model import identify_model
    from vggt_cache.service.model.features import model_spec

    image = write_images(tmp_path, ["a.png"])[0]
    dead = f"http://127.0.0.1:{free_port()}"  # bound, then closed: connections are refused
    cache = FeatureCache(dead, spec=model_spec(identify_model("tiny")), fallback="error", retries=0)
    for _ in range(3):  # the first call marks the URL down; the later ones are refused without trying
        with pytest.raises(CacheUnavailable) as refused:
            cache.get(image)
        assert f"{dead}: ConnectError" in str(refused.value), refused.value
    assert "not retrying yet" in str(refused.value)


def test_training_help_starts_with_the_ten_flags_a_first_run_needs() -> None:
    from vggt_cache.training.train import FIRST_FLAGS, build_parser

    text = build_parser().format_help()
    start = text.index("start here: the flags a first run needs:")
    shown = re.findall(r"^  (--\w+)", text[start:], re.M)
    assert len(FIRST_FLAGS) == 10 and shown[:10] == list(FIRST_FLAGS)
    assert text.index("-h, --help") < start < text.index("--learning_rate")
    assert "--lr_scheduler_type" not in text[:start]
    for group in ("models: Qwen2.5-VL", "data: samples", "VGGT features: the spec", "transformers' TrainingArguments"):
        assert text.index(group) > start


def test_an_allowed_root_that_is_not_a_folder_is_a_warning(tmp_path: Path) -> None:
    from vggt_cache.service.settings import ServiceSettings

    missing = str(tmp_path / "no-such-mount")
    warnings = ServiceSettings(allowed_roots=[str(tmp_path), missing]).warnings()
    assert warnings == [
        f"--allowed-root {missing} is not a folder: nothing under it can be served until it exists (check the path)"
    ]


def test_a_dry_run_without_the_weights_plans_from_the_spec_alone(tmp_path: Path) -> None:
    write_images(tmp_path / "data" / "ep_1", [f"step_{n}_STOP.png" for n in range(3)], size=(64, 48))
    run = cli(
        "precompute",
        "--data_root",
        str(tmp_path / "data"),
        "--preset",
        "janusvln",
        "--dry-run",
        "--state-dir",
        str(tmp_path / "state"),
        env={"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stdout
    assert "model        facebook/VGGT-1B: not on this machine, identity unknown" in run.stdout
    assert "entries      3 (3 forward units): 0 valid, 3 to compute" in run.stdout
    # VGGT-1B at janusvln's crop 644 of a 4:3 frame: 34 x 46 patches of 2048 bfloat16 channels, plus the overhead.
    assert "6,410,240 bytes an entry" in run.stdout and "Loading VGGT model" not in run.stdout


def test_the_dry_run_shows_an_entry_and_the_net_bytes_and_skips_valid_work_by_default(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_images(root / "ep_1", [f"step_{n}_STOP.png" for n in range(2)])
    args = (
        "--data_root",
        str(root),
        "--vggt_model_path",
        "tiny",
        "--device",
        "cpu",
        "--preset",
        "newjanusvln",
        "--size",
        "56",
        "--state-dir",
        str(tmp_path / "state"),
    )
    first = cli("precompute", *args)
    assert "finished: 2 total, 2 computed, 0 skipped, 0 failed" in first.stdout, first.stdout
    again = cli("precompute", *args)  # the default, as the API's: valid work is never recomputed
    assert "finished: 2 total, 0 computed, 2 skipped, 0 failed" in again.stdout, again.stdout
    forced = cli("precompute", *args, "--no-skip-existing", "--dry-run")
    assert "2 valid (recomputed: --no-skip-existing), 2 to compute" in forced.stdout, forced.stdout
    entry = int(
        re.search(r"\(([\d,]+) bytes an entry, net of ([\d,]+) bytes they replace\)", forced.stdout)
        .group(1)
        .replace(",", "")
    )
    assert entry > 16 * 128 * 2  # 4 x 4 patches of 128 bfloat16 channels and the metadata: not a difference
    assert re.search(
        r"2 to compute of [\d.]+ kB each; [\d.]+ k?B to write \(net of the [\d.]+ kB they replace\)", forced.stdout
    ), forced.stdout


def test_an_empty_root_is_one_error_line_in_words_or_for_frames_a_warning(tmp_path: Path, service_server) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    service = service_server(tmp_path, "--attention", "causal")
    looked_for = "causal attention needs clips: no samples (*.jsonl, *.json arrays or step_<n>_<action> episode"
    remote = ("--data_root", str(empty), "--server", service.url)
    for run in (
        cli("precompute", *remote, "--dry-run"),
        cli("precompute", *remote),
        cli(
            "precompute",
            "--data_root",
            str(empty),
            "--vggt_model_path",
            "tiny",
            "--attention",
            "causal",
            "--dry-run",
            "--state-dir",
            str(tmp_path / "state"),
        ),
    ):
        line = one_error(run, looked_for)
        assert "'loc'" not in line and "unexpected" not in line and f"found under {empty}" in line
    frames = cli(
        "precompute",
        "--data_root",
        str(empty),
        "--vggt_model_path",
        "tiny",
        "--device",
        "cpu",
        "--size",
        "56",
        "--state-dir",
        str(tmp_path / "state"),
    )
    assert frames.returncode == 0, frames.stdout
    assert f"[WARN] Nothing to compute: no samples or images found under {empty}" in frames.stdout


def test_status_names_the_spec_the_warnings_and_why_a_job_failed(tmp_path: Path, service_server) -> None:
    import httpx

    from helpers.service import wait_job

    (tmp_path / "empty").mkdir()
    missing = tmp_path / "no-such-mount"
    service = service_server(tmp_path, "--preset", "newjanusvln", "--size", "644", "--allowed-root", str(missing))
    with httpx.Client(base_url=service.url, timeout=60) as http:
        job_id = http.post("/precompute", json={"data_root": str(tmp_path / "empty")}).json()["job_id"]
        assert wait_job(http, job_id)["state"] == "failed"
    run = cli("status", "--server", service.url)
    assert run.returncode == 0, run.stdout
    lines = run.stdout.splitlines()
    assert any(
        line.startswith("spec     newjanusvln (causal attention, pad 644 px, align 14, bfloat16, reference frame last)")
        for line in lines
    ), run.stdout
    assert f"warning  --allowed-root {missing} is not a folder" in run.stdout
    assert any(line.startswith("    error: ") and "causal attention needs clips" in line for line in lines), run.stdout


def test_the_status_page_names_the_preset_the_warnings_and_why_a_job_failed(tmp_path: Path, service_server) -> None:
    import httpx

    from helpers.browser import CHROMIUM
    from helpers.service import wait_job

    if CHROMIUM is None:
        pytest.skip("Debian's chromium package is not installed (.ci/run installs it)")
    from helpers.browser import render

    (tmp_path / "empty").mkdir()
    service = service_server(tmp_path, "--preset", "newjanusvln", "--allowed-root", str(tmp_path / "no-such-mount"))
    with httpx.Client(base_url=service.url, timeout=60) as http:
        job_id = http.post("/precompute", json={"data_root": str(tmp_path / "empty")}).json()["job_id"]
        wait_job(http, job_id)
    dom = render(service.url + "/", str(tmp_path / "profile"))
    assert '<span class="k">preset</span> custom' in dom  # newjanusvln at 56 px is no preset
    assert '<span class="k">preprocessing</span> pad 56 px, align 14' in dom
    assert '<span class="k">warning</span> --allowed-root' in dom
    assert re.search(r'<tr class="job-error"><td colspan="9">failed: [^<]*causal attention needs clips', dom), dom
    assert "connecting…" in (Path(__file__).parents[1] / "service/static/status.html").read_text()
