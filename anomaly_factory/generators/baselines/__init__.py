"""Baseline anomaly generators the factory compares MAGIC against (issue 7).

* ``perlin`` — DRAEM-style Perlin-noise anomalies (Zavrtanik et al., ICCV 2021);
* ``cutpaste`` — CutPaste (Li et al., CVPR 2021).

Both have the generator signature of ``generators/registry.py`` and write the same
pairs format as MAGIC, so every downstream stage treats them alike. They know
nothing of anomaly types: the requested type is only a label.
"""
