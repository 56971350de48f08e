"""adlab engine: every family of visual anomaly detection behind one Detector contract."""

from engine.threads import prepare_environment as _prepare_environment

# Before any engine module imports torch: libgomp reads its wait policy once, when it is loaded.
_prepare_environment()

__version__ = "0.5.0"
