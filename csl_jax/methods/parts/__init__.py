"""Pieces only methods use: losses, pseudo-label selection, passes with a BN policy, views, EMA teacher.

    losses         CE with ignore, OHEM, weighted unlabeled CE (per loss group)
    pseudo_labels  the CSL selector and the confidence threshold
    passes         train/eval passes, pseudo-label targets and their metrics
    views          CutMix pasting and TMP masking inside the step
    teacher        EMA of params and BN statistics
"""
