"""The anomaly generators: MAGIC, AnomalyControl, the Perlin and CutPaste baselines, and
the demo's oracle, all behind one contract (:mod:`.base`) and one registry (:mod:`.registry`).

Adding a generator
------------------
One folder, one registry line, one config section; nothing else in the factory changes
(``tests/test_generator_protocol.py`` follows these steps with a toy generator):

1. **A folder** ``anomaly_factory/generators/<name>/`` with a class that has ``name``,
   ``fewshot_typed`` and the methods of :class:`.base.Generator`:

   * ``prepare_category(cfg, manifest, category)``: train what the category's types
     share, cached (a no-op when they share nothing);
   * ``prepare(request) -> Path | None``: train what a type needs into
     ``request.train_dir`` (or the generator's own cache), return a finished training as
     is and resume an interrupted one; None when nothing is learned (subclass
     :class:`.base.Untrained`).
   * ``generate(request, on_pair) -> Path``: for ``i`` in ``range(request.n_pairs)``, skip
     ``output.is_done(out_dir, key)``; seed the pair with
     ``common.pair_seed(cfg.<name>.seed, category, anomaly_type, i)`` and draw every
     random choice from that seed; take normals from the ``train`` split only; write it
     with ``output.save_pair(..., output.pair_metadata(...))``, whose ``**params`` are the
     generator's own settings (they land in the ``params`` JSON column); call
     ``on_pair(done, total)``; end with ``output.write_pairs_manifest(out_dir)``.
     Read images and masks with :mod:`anomaly_factory.images` and choose the device
     with ``common.resolve_device``.

2. **A registry line** in :data:`.registry.GENERATORS`:
   ``"<name>": "anomaly_factory.generators.<name>.<module>:<Class>"``. ``generator:`` in
   pipelines.yaml then accepts the name, and every route (``anomaly-factory generate``,
   the Prefect flows, ``dvc repro``) runs it through the stage functions.

3. **A config section**: a :class:`~anomaly_factory.config.Section` subclass in
   ``config.py`` and a field ``<name>: <Name>Section`` on ``FactoryConfig`` (with a
   ``seed``), its defaults in pipelines.yaml. Unknown keys are rejected there, so users
   get an error naming the field for a typo.

The gates, detectors, shards and report need nothing: they read the core columns.
"""
