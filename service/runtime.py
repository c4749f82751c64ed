"""The running service: model, engine and job manager, started once and shared by every request."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from vggt_cache.client.spec import FeatureSpec, positive_int
from vggt_cache.client.text import error_text
from vggt_cache.service.devices import parse_devices
from vggt_cache.service.engine import Engine
from vggt_cache.service.engine.device import ForwardHook
from vggt_cache.service.jobs.options import JobLimits
from vggt_cache.service.jobs.runner import JobManager
from vggt_cache.service.jobs.store import JobStore
from vggt_cache.service.model import LoadedModel, load_aggregator
from vggt_cache.service.model.features import model_spec
from vggt_cache.service.paths import AllowedRoots
from vggt_cache.service.settings import ServiceSettings, read_variable

log = logging.getLogger("vggt_cache")


def model_info(loaded: LoadedModel, engine: Engine) -> dict:
    """What /status and the manifest say of the model `engine` holds resident."""
    devices, spec = engine.devices, engine.spec
    return {
        "source": loaded.source,
        "fingerprint": loaded.fingerprint,
        "parameters": loaded.num_params,
        "devices": devices,
        "compute_dtype": "float32" if devices == ["cpu"] else "bfloat16 (autocast)",
        "storage_dtype": spec.dtype,
        "weights_dtype": engine.weights_dtype_name,
        "embed_dim": loaded.config.embed_dim,
        "depth": loaded.config.depth,
    }


class ModelUnavailable(RuntimeError):
    """The model source cannot be loaded: missing, unreadable, or not a VGGT aggregator (the message says which)."""


@dataclass
class Components:
    loaded: LoadedModel
    spec: FeatureSpec
    engine: Engine
    jobs: JobManager
    devices: list[str]


def build_components(
    s: ServiceSettings,
    allowed: AllowedRoots,
    rank: int = 0,
    world_size: int = 1,
    before_forward: ForwardHook | None = None,
) -> Components:
    """Load the model once, start the engine on its devices; the job manager is built but not started.

    `before_forward`: the engine's hook (see `Engine`), to hold or fail the device in drills and tests.
    """
    started_at = time.time()  # before the (long) model load: see JobManager
    devices = parse_devices(s.device)
    if s.device == "auto":
        log.info("--device auto: %s", "every visible GPU" if devices != ["cpu"] else "no GPU is visible, using the CPU")
    log.info("Loading VGGT model from %s onto %s", s.model, ", ".join(devices))
    t0 = time.perf_counter()
    try:
        loaded = load_aggregator(s.model, device=devices[0])
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(str(exc)) from exc
    spec = model_spec(loaded, **s.spec)
    log.info(
        "Model ready in %.1fs: %s parameters, fingerprint %s, spec %s (%s attention, layers %s)",
        time.perf_counter() - t0,
        f"{loaded.num_params:,}",
        loaded.fingerprint,
        spec.digest,
        spec.attention,
        list(spec.layers),
    )
    engine = Engine(
        loaded,
        spec,
        devices=devices,
        max_batch_frames=s.max_batch_frames,
        max_wait_ms=s.max_wait_ms,
        decode_workers=s.decode_workers,
        write_workers=s.write_workers,
        bulk_queue_batches=s.bulk_queue_batches,
        hint_queue_batches=s.hint_queue_batches,
        frame_cache_frames=s.frame_cache_frames,
        patch_cache_bytes=s.patch_cache_mb << 20,
        fp32_weights=s.fp32_weights,
        compile=s.compile,
        compile_backend=s.compile_backend,
        roots=allowed.real,
        max_image_bytes=s.max_image_bytes,
        before_forward=before_forward,
        file_mode=s.file_mode,
    )
    engine.start()
    info = model_info(loaded, engine)
    jobs = JobManager(JobStore(s.state_dir), engine, spec, allowed, info, rank, world_size, started_at, JobLimits.of(s))
    return Components(loaded, spec, engine, jobs, devices)


FAILED_REMINDER_S = 60.0
DRILL_HOLD_ENV = "VGGT_CACHE_DRILL_HOLD_FRAMES"


def drill_hook() -> ForwardHook | None:
    """A drill of a forward that never ends: with VGGT_CACHE_DRILL_HOLD_FRAMES=N, a batch of clips of N frames
    or more holds its device until the process ends (rehearses poison units, cancel and SIGTERM's grace)."""
    value = read_variable(DRILL_HOLD_ENV)
    if not value:
        return None
    frames = positive_int(DRILL_HOLD_ENV, int(value))
    log.warning("Drill (%s=%d): a forward of clips of %d frames or more never ends", DRILL_HOLD_ENV, frames, frames)

    def hold(batch) -> None:  # [B, S, 3, H, W]
        if batch.shape[1] >= frames:
            log.warning("Drill: holding a forward of %d-frame clips", batch.shape[1])
            threading.Event().wait()

    return hold


class ServiceRuntime:
    """Loads the model in the background so health probes answer while VGGT-1B is read from disk.

    A model that fails to load leaves the service up, answering 503 (the probes show why), and
    logging every `failed_reminder_s` that it serves nothing, so a log reader cannot miss it.
    """

    def __init__(
        self,
        settings: ServiceSettings,
        before_forward: ForwardHook | None = None,
        failed_reminder_s: float = FAILED_REMINDER_S,
        on_loaded: Callable[[], None] | None = None,
    ) -> None:
        """Raises ValueError for settings that cannot be meant (`ServiceSettings.check`); logs the unsafe ones.
        `on_loaded`: called once the model is loaded and warmed up, before any job resumes."""
        settings.check()
        self.settings = settings
        self._before_forward = before_forward if before_forward is not None else drill_hook()
        self.allowed = AllowedRoots.of(settings.allowed_roots)
        self.warnings = settings.warnings()
        for warning in self.warnings:
            log.warning("%s", warning)
        self.components: Components | None = None
        self.load_error: str | None = None
        self.failed_reminder_s = failed_reminder_s
        self._on_loaded = on_loaded
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._deadline: float | None = None  # set when shutdown begins: the work in flight has until then
        self._warming = False  # compiling the spec's shapes (--compile): not ready yet
        self.stopped_cleanly = True

    @property
    def state(self) -> str:
        if self.components is not None:
            return "ready"
        if self.load_error:
            return "failed"
        return "warming up" if self._warming else "loading"

    def start(self, background: bool = True) -> None:
        """Load the model and start the engine and the job runner, once (a second call does nothing)."""
        if self._thread is not None or self.components is not None:
            return
        if background:
            self._thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
            self._thread.start()
        else:
            self._load()

    def _load(self) -> None:
        try:
            components = build_components(self.settings, self.allowed, before_forward=self._before_forward)
            self._warming = True
            try:  # before any request or job: a compile on the device thread would stall them
                components.engine.warm_up(self.settings.compile_warmup_s, stopping=self._stopping.is_set)
            finally:
                self._warming = False
            if self._stopping.is_set():  # stopped while warming up: nothing was served
                components.engine.stop(timeout=self._grace_left())
                return
            if self._on_loaded is not None:
                self._on_loaded()
            components.jobs.start()
            self.components = components
        except Exception as exc:  # reported by /readyz and /status; the process stays up for inspection
            self.load_error = error_text(exc)
            log.error("Model failed to load: %s", self.load_error)
            threading.Thread(target=self._remind, name="model-failed", daemon=True).start()

    def _remind(self) -> None:
        while not self._stopping.wait(self.failed_reminder_s):
            log.error(
                "Serving nothing: the model failed to load (%s); every request but the probes answers 503. "
                "Fix --model and restart the service",
                self.load_error,
            )

    def begin_shutdown(self) -> None:
        """Start the grace (`shutdown_grace_s`) that the work in flight has; a second call keeps the first."""
        if self._deadline is None:
            self._deadline = time.monotonic() + self.settings.shutdown_grace_s

    def _grace_left(self) -> float:
        assert self._deadline is not None  # asked once the shutdown began
        return max(0.0, self._deadline - time.monotonic())

    def stop(self) -> None:
        """Stop the job runner and the engine within the grace; a batch still running past it is abandoned
        (`stopped_cleanly` False), its units pending for the next start."""
        self.begin_shutdown()
        self._stopping.set()
        c = self.components
        if c is None:
            return
        log.info("Shutting down: finishing the batch in flight (grace %gs)", self._grace_left())
        c.jobs.stop(timeout=0.0)  # no more submissions; the queued units the engine drops stay pending
        self.stopped_cleanly = c.engine.stop(timeout=self._grace_left())
        c.jobs.stop(timeout=self._grace_left())  # the runner records what finished
        if not self.stopped_cleanly:
            c.jobs.abandon()
            log.warning(
                "Shutting down: the batch in flight did not end within the %gs grace (--shutdown-grace); "
                "abandoned, its units stay pending for the next start",
                self.settings.shutdown_grace_s,
            )
