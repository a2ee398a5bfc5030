"""cellmonitor: live-cell microscope monitoring with EWC-FAISS cell-state classification."""

__version__ = "0.1.0"
