"""Phoebus screens (``*.bob``) generated from the PV declaration by ``python -m ptychopv.opi.generate``."""
