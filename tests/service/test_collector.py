import subprocess
import sys
import textwrap


def test_start_up_is_settled_once_per_process():
    # In a process of its own: freezing is for the whole process.
    script = textwrap.dedent(
        """
        import gc
        from vggt_cache.service import collector

        assert gc.get_freeze_count() == 0
        kept = [[] for _ in range(1000)]
        collector.settle_start_up()
        frozen = gc.get_freeze_count()
        assert frozen >= 1000, frozen
        assert gc.get_threshold()[0] == collector.YOUNG_THRESHOLD
        later = [[] for _ in range(1000)]
        collector.settle_start_up()  # once: what the process made since is collected as ever
        assert gc.get_freeze_count() == frozen
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # young cycles are still found
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_runtime_calls_on_loaded_once_the_model_is_warm_and_before_jobs_resume(tmp_path):
    from vggt_cache.service.runtime import ServiceRuntime
    from vggt_cache.service.settings import ServiceSettings

    from helpers.service import TINY_MODEL

    seen = []
    runtime = ServiceRuntime(
        ServiceSettings(
            model=str(TINY_MODEL), device="cpu", allowed_roots=[str(tmp_path)], state_dir=str(tmp_path / "state")
        ),
        on_loaded=lambda: seen.append((runtime.components, runtime.state)),
    )
    try:
        runtime.start(background=False)
        assert runtime.state == "ready"
        assert seen == [(None, "loading")]  # called once, before the components (and their jobs) were started
    finally:
        runtime.stop()
