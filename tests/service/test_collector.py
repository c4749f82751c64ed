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
