"""AnomalyControl: cross-modal controllable anomaly synthesis (arXiv 2412.06510).

CSM (``csm.py``) encodes a text + image reference with BLIP-2's Q-Former, ASEA
(``asea.py``) focuses its attention on the reference's anomaly mask, and SGA
(``sga.py``) injects the resulting semantic tokens into the inpainting UNet
through diffusers' IP-Adapter decoupled cross-attention. ``train.py`` trains the
adapter and ``pairs.py`` writes pairs in the factory's one output format.
"""
