"""The science library: pure functions and small classes on numpy arrays, no I/O, no EPICS,
no PyTorch, no HPC.

- ``physics``: the far-field forward model (probes, scans, diffraction, Poisson counts);
- ``samples``: sample families (evaluation and training kinds of sample);
- ``preprocess``: detector frames to network input (ROI, crop, binning, bad pixels, scale);
- ``stitching``: per-frame phase patches into one live image;
- ``metrics``: NRMSE and SSIM of phase images against a reference.
"""
