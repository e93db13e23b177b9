"""Stage 4: texture refinement of a fixed mesh against views (:mod:`.refine`), baking to a UV texture or vertex
colours (:mod:`.bake`) and export to GLB / OBJ / PLY (:mod:`.export`)."""
