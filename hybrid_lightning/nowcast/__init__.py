"""The meta-trained nowcaster's corpus and training commands, and its shipped weights (``nowcaster.pt``).

    python -m hybrid_lightning.nowcast.corpus   # record 240 generated tasks (about 21 minutes, 357 MB)
    python -m hybrid_lightning.nowcast.train    # fit the model, score it on held-out tasks (about 1 minute)

The model and the predictor that uses it live in :mod:`hybrid_lightning.core.nowcaster`
(``predictor: nowcast`` in the config).
"""
