"""Transport and files: what crosses a wire or a disk, and nothing of the science.

- ``ntndarray``: NTNDArray values to and from numpy (every dtype, the areaDetector codecs);
- ``scanfile``: the HDF5 scan layout (frames, positions, uniqueIds, ground truth);
- ``epics_env``: the loopback EPICS environment every server and client of this project uses;
- ``generated``: write generated files (database, screens) or check that they are current.
"""
