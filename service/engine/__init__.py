"""The engine package: `Engine` (engine.py) and what flows through it (work.py); the stages have a module each."""

from vggt_cache.service.engine.engine import Engine, EngineState
from vggt_cache.service.engine.work import EngineStopped, EntryResult, Priority, QueueFull, UnitResult, Withdrawn
from vggt_cache.service.units import Unit

__all__ = [
    "Engine",
    "EngineState",
    "EngineStopped",
    "EntryResult",
    "Priority",
    "QueueFull",
    "Unit",
    "UnitResult",
    "Withdrawn",
]
