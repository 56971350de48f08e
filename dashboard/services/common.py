"""Shared by every service module: where the project lives, the upload limits, and the errors pages show."""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from engine.api import AdlabError, DataValidationError
from engine.data import Limits

log = logging.getLogger("adlab.dashboard")

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_ROOT = ROOT / "sample_data"
MAX_UPLOAD_MB = 200  # keep equal to server.maxUploadSize in .streamlit/config.toml
UPLOAD_LIMITS = Limits()
# A Ray cluster to hand training jobs to ("auto", "ray://head:10001", or "local" for a runtime started by this
# server): several people's jobs then train at once on the cluster's free CPUs instead of queueing here.
RAY_ADDRESS = os.environ.get("ADLAB_RAY_ADDRESS") or None
RAY_JOB_CPUS = float(os.environ.get("ADLAB_RAY_JOB_CPUS", "2"))  # CPUs each job asks Ray for
# "process": each job trains in a worker process (the default); "ray": as a Ray task (the default when
# ADLAB_RAY_ADDRESS is set); "thread": in a thread of this process, for tests that patch the engine in-process.
JOB_ISOLATION = os.environ.get("ADLAB_JOB_ISOLATION", "ray" if RAY_ADDRESS else "process")
# Jobs running at once; the others wait in order. With Ray the cluster decides how many really run (a job waits
# there for free CPUs), so the server hands over many.
MAX_CONCURRENT_JOBS = int(os.environ.get("ADLAB_MAX_JOBS", "16" if JOB_ISOLATION == "ray" else "1"))
# Methods of one job trained at once, each group in a worker process of its own with CPUs/N threads
# (engine.parallel; process isolation only). 1: one after another in one worker.
JOB_WORKERS = max(1, int(os.environ.get("ADLAB_JOB_WORKERS", "1")))
BACKBONES = ["efficientnet_lite0", "resnet18", "wide_resnet50_2"]
IMAGE_SIZES = [128, 160, 192, 224, 256, 320]
TILE_SIZES = [128, 192, 256, 320, 384, 512]  # the Train page's "tile large images" sizes


class UserError(Exception):
    """A problem to show the user as one message (never a stack trace)."""


class DataProblems(UserError):
    """A dataset or upload failed validation: `problems` lists (file, message, hint) for every problem found."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) with the data")


def _user_error(e: Exception) -> UserError:
    if isinstance(e, DataValidationError):
        return DataProblems([(p.path, p.message, p.hint) for p in e.problems])
    if isinstance(e, AdlabError):
        return UserError(str(e))
    log.error("unexpected error:\n%s", traceback.format_exc())
    return UserError(f"{type(e).__name__}: {e}")
