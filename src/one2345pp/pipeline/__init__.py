"""Inference: the pipeline that chains the exported stages (:mod:`.one2345`), its input preprocessing
(:mod:`.preprocess`), the pipeline folder built from trained runs (:mod:`.build`, ``one2345pp export --multiview``),
the per-image job of ``one2345pp infer`` (:mod:`.infer`) and its turntable renders (:mod:`.turntable`)."""
