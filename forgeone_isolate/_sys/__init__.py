"""ctypes bindings and kernel constants only; no logic (see libc.py)."""
