"""The scoring wing: how sharp is the focused object, where is it, and pictures that show it.

metrics.py (variance of Laplacian, Brenner, Tenengrad, target/background reports), masks.py (target regions from
attention maps, boxes or mask files), attnmaps.py (the focus words' cross-attention, collected while sampling as a
`sampling.Probe`), pictures.py (contact sheets, mask overlays, sharpness heat maps, captioned strips, animations),
trace.py (the x̂0 filmstrip of a run, a `sampling.Watcher`) and rack.py (rack focus: one layout stage, K focus
branches pulling focus between two objects). It imports the core and is never imported by it.
"""
