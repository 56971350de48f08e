"""adlab engine: every family of visual anomaly detection behind one Detector contract."""

__version__ = "0.1.0"
