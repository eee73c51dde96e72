"""The base layer: errors, atomic files, the run-folder lock, peak memory, DDP and the runtime checks
(autocast, device). It imports nothing else of ladder_clip."""
